"""The engine: one EVALSHA per decision, typed results."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import redis

from quotas.engine.scripts import Scripts
from quotas.engine.types import (
    BudgetAdjustment,
    Check,
    Conflict,
    Existing,
    Granted,
    Held,
    KeyHolder,
    LeaseRestore,
    LeaseView,
    LimitState,
    Lost,
    Missing,
    Owner,
    PoolOption,
    Refused,
    Report,
    ReserveCall,
    Settled,
    Snapshot,
    Stale,
    Unavailable,
    Usage,
)

Reply = dict[str, Any]


class KeySpace:
    """Every key carries one hash tag, so a decision's keys share a Redis Cluster slot."""

    def __init__(self, tag: str) -> None:
        self.prefix = f"q:{{{tag}}}:"
        self.version = self.prefix + "config_version"
        self.leases = self.prefix + "leases"
        self.rebuild_lock = self.prefix + "rebuild_lock"
        self.rebuilt_at = self.prefix + "rebuilt_at"
        self.events = self.prefix + "events"
        self.lease_prefix = self.prefix + "r:"

    def lease(self, reservation_id: str) -> str:
        return self.lease_prefix + reservation_id

    def idempotency(self, tenant_id: int, key: str) -> str:
        return f"{self.prefix}idem:{tenant_id}:{key}"

    # Buckets are strings "level:t"; they were hashes under b: and g:. The new names keep
    # the two formats apart, not the limits: while old and new nodes both serve, each keeps
    # its own bucket (up to twice the rate is admitted), and the new ones start full. A lease
    # that still names an old key settles into the new bucket (`bucket_key` in lib.lua).
    def bucket(self, limit_id: int) -> str:
        return f"{self.prefix}tb:{limit_id}"

    def guarantee(self, limit_id: int) -> str:
        return f"{self.prefix}tg:{limit_id}"

    def concurrency(self, limit_id: int) -> str:
        return f"{self.prefix}c:{limit_id}"

    def period(self, limit_id: int, start_ms: int) -> str:
        return f"{self.prefix}p:{limit_id}:{start_ms}"

    def pressure(self, pool_id: int) -> str:
        """A pool's adaptive share and breaker (see pressure.lua)."""
        return f"{self.prefix}bp:{pool_id}"


class Engine:
    def __init__(
        self,
        client: redis.Redis,
        *,
        hash_tag: str,
        retention_ms: int = 3_600_000,
        stream_maxlen: int = 0,
        clock_offset_ms: int = 0,
    ) -> None:
        self.client = client
        self.keys = KeySpace(hash_tag)
        self.scripts = Scripts(client)
        self.retention_ms = retention_ms
        self.stream_maxlen = stream_maxlen
        # Tests move or stop the clock; production leaves both alone and Redis TIME rules.
        self.clock_offset_ms = clock_offset_ms
        self.frozen_ms: int | None = None

    def reserve(
        self, call: ReserveCall
    ) -> Granted | Refused | Unavailable | Existing | Conflict | Stale | Lost:
        keys = [
            self.keys.version,
            self.keys.lease(call.reservation_id),
            self.keys.leases,
            self.keys.events,
            self._idempotency_key(call),
            *_option_keys(call.options),
        ]
        return self._reserve_result(self.scripts.call("reserve", keys, self._reserve_payload(call)))

    def commit(
        self,
        *,
        reservation_id: str,
        owner: Owner | KeyHolder,
        usage: Usage,
        version: int | None,
        report: Report | None = None,
    ) -> Settled | Conflict | Missing | Stale | Lost:
        payload = self._owner_payload(owner, version)
        if report is not None:
            payload["report"] = report.as_lua()
        payload["usage"] = {
            "in_": usage.input_tokens,
            "cached": usage.cached_input_tokens,
            "out": usage.output_tokens,
            "requests": 1,
            "hash": usage.body_hash,
            "extra": usage.extra,
        }
        return self._settle_result(self._lease_call("commit", reservation_id, payload))

    def release(
        self,
        *,
        reservation_id: str,
        owner: Owner | KeyHolder,
        version: int | None,
        report: Report | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Settled | Conflict | Missing | Stale | Lost:
        payload = self._owner_payload(owner, version)
        if report is not None:
            payload["report"] = report.as_lua()
        if extra:
            payload["extra"] = extra
        return self._settle_result(self._lease_call("release", reservation_id, payload))

    def extend(
        self, *, reservation_id: str, owner: Owner | KeyHolder, ttl_ms: int, version: int | None
    ) -> LeaseView | Conflict | Missing | Stale | Lost:
        payload = self._owner_payload(owner, version)
        payload["ttl_ms"] = ttl_ms
        return self._lease_result(self._lease_call("extend", reservation_id, payload))

    def peek(
        self, *, reservation_id: str, owner: Owner | KeyHolder, version: int | None
    ) -> LeaseView | Conflict | Missing | Stale | Lost:
        payload = self._owner_payload(owner, version)
        return self._lease_result(self._lease_call("peek", reservation_id, payload))

    def reap(self, *, batch: int = 500) -> int:
        payload = {
            "lease_prefix": self.keys.lease_prefix,
            "maxlen": self.stream_maxlen,
            "retention_ms": self.retention_ms,
            **self._clock(),
            "batch": batch,
        }
        keys = [self.keys.version, self.keys.leases, self.keys.events]
        return int(self.scripts.call("reap", keys, payload))

    def inspect(self, checks: list[Check]) -> list[dict[str, Any]]:
        """The current state of some limits (used, remaining, reset_ms), changing nothing."""
        if not checks:
            return []
        keys = [k for check in checks for k in check.redis_keys()]
        payload = {**self._clock(), "checks": [c.as_lua() for c in checks]}
        return _as_list(self.scripts.call("inspect", keys, payload))

    def held(
        self,
        *,
        tenant_id: int | None = None,
        feature_id: int | None = None,
        pool: str | None = None,
        show: int = 20,
        scan: int = 10_000,
    ) -> Held:
        """The reservations held now that match, soonest expiry first, changing nothing; at
        most `scan` held leases are looked at, and `Held.complete` says if that was all."""
        wanted = {"tenant": tenant_id, "feature": feature_id, "pool": pool}
        payload = {
            **self._clock(),
            "lease_prefix": self.keys.lease_prefix,
            "show": show,
            "scan": scan,
            **{name: value for name, value in wanted.items() if value is not None},
        }
        reply = self.scripts.call("held", [self.keys.leases], payload)
        return Held(
            count=int(reply["count"]),
            complete=bool(reply["complete"]),
            leases=tuple(_as_list(reply["leases"])),
            now_ms=int(reply["now_ms"]),
            waiting=int(reply.get("waiting", 0)),
        )

    # -- the ledger's side: snapshots, recovery, trimming ----------------------------------

    def snapshot(self, counter_keys: list[str], *, group: str) -> Snapshot:
        """Counters and the events `group` has not acknowledged, at one instant."""
        reply = self.scripts.call("snapshot", [self.keys.events, *counter_keys], {"group": group})
        values = tuple(None if v is False else int(v) for v in _as_list(reply["values"]))
        entries = tuple(
            (entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))
            for entry_id, flat in _as_list(reply["entries"])
        )
        return Snapshot(values=values, entries=entries)

    def rebuild(
        self, adjustments: list[BudgetAdjustment], leases: list[LeaseRestore]
    ) -> dict[str, int]:
        """Add to budget counters and write missing leases with their slots, atomically."""
        payload = {
            "adjust": [{"by": a.by, "expire_at": a.expire_at_ms} for a in adjustments],
            "leases": [
                {
                    "key": self.keys.lease(r.reservation_id),
                    "id": r.reservation_id,
                    "lease": json.dumps(r.lease, separators=(",", ":")),
                    "e": r.expires_ms,
                    "px": max(1, r.expires_ms - self.now_ms()) + self.retention_ms,
                    "slots": list(r.slots),
                }
                for r in leases
            ],
        }
        keys = [self.keys.leases, *(a.key for a in adjustments)]
        return dict(self.scripts.call("rebuild", keys, payload))

    def trim_events(self) -> int:
        """Drop the usage events that every consumer group has acknowledged."""
        return int(self.scripts.call("trim", [self.keys.events], {}))

    def pressure_state(self, pool_id: int) -> dict[str, float]:
        """A pool's adaptive share and breaker as the scripts keep them (pressure.lua), with
        the engine's time: `share` (1 when never adapted), `open_until_ms` (0: closed)."""
        share, open_until = self.client.hmget(self.keys.pressure(pool_id), "s", "o")
        return {
            "share": float(share) if share is not None else 1.0,
            "open_until_ms": float(open_until) if open_until is not None else 0.0,
            "now_ms": float(self.now_ms()),
        }

    def now_ms(self) -> int:
        if self.frozen_ms is not None:
            return self.frozen_ms
        seconds, micros = self.client.time()
        return seconds * 1000 + micros // 1000 + self.clock_offset_ms

    def now_ms_estimate(self) -> int:
        """This node's clock, only to pick candidate periods; Redis's clock decides."""
        if self.frozen_ms is not None:
            return self.frozen_ms
        return int(time.time() * 1000) + self.clock_offset_ms

    def _clock(self) -> dict[str, int]:
        if self.frozen_ms is not None:
            return {"clock_ms": self.frozen_ms}
        return {"clock_offset_ms": self.clock_offset_ms}

    # -- payloads -------------------------------------------------------------------------

    def _idempotency_key(self, call: ReserveCall) -> str:
        if call.idempotency_key:
            return self.keys.idempotency(call.tenant_id, call.idempotency_key)
        return self.keys.idempotency(call.tenant_id, "-")

    def _reserve_payload(self, call: ReserveCall) -> dict[str, Any]:
        """ARGV[1] of reserve.lua (see its header)."""
        payload: dict[str, Any] = {
            "version": call.version,
            "id": call.reservation_id,
            "ttl_ms": call.ttl_ms,
            "retention_ms": self.retention_ms,
            "maxlen": self.stream_maxlen,
            "lease_prefix": self.keys.lease_prefix,
            **self._clock(),
            "in_": call.input_tokens,
            "out": call.max_output_tokens,
            "min_out": call.min_output_tokens,
            "cost": {"a": call.cost_fixed, "b": call.cost_per_output},
            "lease": {
                "tenant": call.tenant_id,
                "feature": call.feature_id,
                "prices": dict(zip("ico", call.prices, strict=True)),
                "meta": call.meta,
            },
            "options": [_option_lua(option) for option in call.options],
        }
        if call.idempotency_key:
            payload["idempotency"] = {"hash": call.idempotency_hash}
        if call.key_digest:
            payload["lease"]["kd"] = call.key_digest
        if call.max_wait_ms:
            payload["max_wait"] = call.max_wait_ms
        return payload

    def _owner_payload(self, owner: Owner | KeyHolder, version: int | None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "maxlen": self.stream_maxlen,
            "retention_ms": self.retention_ms,
            **self._clock(),
        }
        if version is not None:  # absent, not null: cjson reads null as a value, not nil
            payload["version"] = version
        if isinstance(owner, KeyHolder):
            payload["kd"] = owner.digest
        else:
            payload["tenant"] = owner.tenant_id
            payload["features"] = list(owner.feature_ids)
        return payload

    def _lease_call(self, script: str, reservation_id: str, payload: dict[str, Any]) -> Reply:
        keys = [
            self.keys.version,
            self.keys.lease(reservation_id),
            self.keys.leases,
            self.keys.events,
        ]
        reply: Reply = self.scripts.call(script, keys, payload)
        return reply

    # -- replies --------------------------------------------------------------------------

    @staticmethod
    def _reserve_result(
        reply: Reply,
    ) -> Granted | Refused | Unavailable | Existing | Conflict | Stale | Lost:
        if reply.get("stale"):
            return Stale()
        if reply.get("lost"):
            return Lost()
        if reply.get("conflict"):
            return Conflict(state="idempotency")
        if "existing" in reply:
            lease = LeaseView(data=reply["existing"], now_ms=reply["now_ms"])
            existing = reply["existing"]
            return Existing(lease=lease, granted=_granted(existing, existing.get("limits")))
        if reply["granted"]:
            granted = _granted(reply["lease"], reply["limits"])
            if "breaker" in reply:
                return replace(granted, breaker=tuple(_as_list(reply["breaker"])))
            return granted
        if reply["reason"] == "upstream_unavailable":
            return Unavailable(
                pool=reply["pool"],
                retry_after_ms=max(0, int(reply["retry_ms"])),
                now_ms=int(reply["now_ms"]),
            )
        retry = reply.get("retry_ms")
        return Refused(
            reason=reply["reason"],
            limit_id=reply["limit"],
            remaining=reply["remaining"],
            cap=int(reply["cap"]),
            needed=int(reply["needed"]),
            retry_after_ms=None if retry is None else max(0, int(retry)),
            now_ms=int(reply["now_ms"]),
        )

    @staticmethod
    def _settle_result(reply: Reply) -> Settled | Conflict | Missing | Stale | Lost:
        if reply.get("stale"):
            return Stale()
        if reply.get("lost"):
            return Lost()
        if reply.get("missing"):
            return Missing()
        if "conflict" in reply:
            return Conflict(state=reply["conflict"], wait_ms=reply.get("wait_ms"))
        return Settled(result=reply["result"])

    @staticmethod
    def _lease_result(reply: Reply) -> LeaseView | Conflict | Missing | Stale | Lost:
        if reply.get("stale"):
            return Stale()
        if reply.get("lost"):
            return Lost()
        if reply.get("missing"):
            return Missing()
        if "conflict" in reply:
            return Conflict(state=reply["conflict"])
        return LeaseView(data=reply["lease"], now_ms=int(reply["now_ms"]))


def _granted(lease: dict[str, Any], limits: Any) -> Granted:
    """A grant as the lease recorded it, and the state its limits were left in."""
    return Granted(
        reservation_id=lease["id"],
        pool=lease["pool"],
        output_tokens=int(lease["r"]["out"]),
        cost_nusd=int(lease["r"]["cost"]),
        expires_ms=int(lease["e"]),
        now_ms=int(lease["created"]),
        limits=tuple(
            LimitState(
                limit_id=d["id"],
                cap=int(d["cap"]),
                remaining=d["remaining"],
                reset_ms=d.get("reset_ms"),
                configured=d.get("cfg"),
            )
            for d in _as_list(limits)
        ),
        would_refuse=tuple(_as_list(lease["soft"])),
        start_ms=lease.get("sa"),
    )


def _option_lua(option: PoolOption) -> dict[str, Any]:
    data: dict[str, Any] = {
        "pool": option.pool,
        "checks": [check.as_lua() for check in option.checks],
    }
    if option.pressure is not None:
        data["bp"] = option.pressure.as_lua()
    return data


def _option_keys(options: tuple[PoolOption, ...]) -> list[str]:
    """Every key the options may touch, declared to Redis as the script's keys."""
    keys = [
        key
        for option in options
        for check in option.checks
        for key in (*check.redis_keys(), *(k for k, _ in check.guards))
    ]
    keys += [option.pressure.key for option in options if option.pressure is not None]
    return keys


def _as_list(value: Any) -> list[Any]:
    """Lua's cjson writes an empty array as {}."""
    return list(value) if isinstance(value, list) else []
