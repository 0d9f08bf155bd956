"""The engine: one EVALSHA per decision, typed results."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import redis

from quotas.engine.partitions import (
    partition_tags,
    reservation_id_new,
    reservation_partition,
    tenant_partition,
)
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
    Pressure,
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
    """One partition's keys (see partitions.py): every key carries the partition's hash tag,
    so a decision's keys share a Redis Cluster slot."""

    def __init__(self, tag: str, index: int = 0, count: int = 1) -> None:
        self.index, self.count = index, count
        self.prefix = f"q:{{{tag}}}:"
        self.allot = self.prefix + "allot"  # shared limits' allotments (allot.lua)
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
        partitions: int = 1,
        retention_ms: int = 3_600_000,
        stream_maxlen: int = 0,
        clock_offset_ms: int = 0,
        rebalance_ms: int = 1000,
    ) -> None:
        self.client = client
        self.spaces = tuple(
            KeySpace(tag, index, partitions)
            for index, tag in enumerate(partition_tags(hash_tag, partitions))
        )
        # the home partition: the configuration's version every process reads, the spool
        self.keys = self.spaces[0]
        self.scripts = Scripts(client)
        self.retention_ms = retention_ms
        self.stream_maxlen = stream_maxlen
        self.rebalance_ms = rebalance_ms  # how often allotments move (allot.lua)
        # Tests move or stop the clock; production leaves both alone and Redis TIME rules.
        self.clock_offset_ms = clock_offset_ms
        self.frozen_ms: int | None = None

    def reserve(
        self, call: ReserveCall
    ) -> Granted | Refused | Unavailable | Existing | Conflict | Stale | Lost:
        space = self.tenant_space(call.tenant_id)
        keys = [
            space.version,
            space.lease(call.reservation_id),
            space.leases,
            space.events,
            space.idempotency(call.tenant_id, call.idempotency_key or "-"),
            *_option_keys(call.options),
        ]
        payload = self._reserve_payload(call, space)
        if space.count > 1:
            keys.append(space.allot)
        return self._reserve_result(self.scripts.call("reserve", keys, payload))

    # -- partitions -----------------------------------------------------------------------

    @property
    def partitioned(self) -> bool:
        return len(self.spaces) > 1

    def tenant_space(self, tenant_id: int) -> KeySpace:
        """The partition that holds a tenant's limits, leases and usage events."""
        return self.spaces[tenant_partition(tenant_id, len(self.spaces))]

    def reservation_space(self, reservation_id: str) -> KeySpace:
        return self.spaces[reservation_partition(reservation_id, len(self.spaces))]

    def reservation_id(self, tenant_id: int) -> str:
        return reservation_id_new(self.tenant_space(tenant_id).index)

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

    def reap(self, *, batch: int = 500, space: KeySpace | None = None) -> int:
        """Expire up to `batch` due leases of one partition (the home one by default)."""
        space = space or self.keys
        payload = {
            "lease_prefix": space.lease_prefix,
            "maxlen": self.stream_maxlen,
            "retention_ms": self.retention_ms,
            **self._clock(),
            "batch": batch,
        }
        keys = [space.version, space.leases, space.events]
        return int(self.scripts.call("reap", keys, payload))

    def inspect(self, checks: list[Check], space: KeySpace | None = None) -> list[dict[str, Any]]:
        """The current state of some limits (used, remaining, reset_ms) on one partition (the
        one their keys name), changing nothing."""
        if not checks:
            return []
        space = space or self.keys
        keys = [k for check in checks for k in check.redis_keys()]
        payload = {**self._clock(), "checks": [c.as_lua() for c in checks]}
        if space.count > 1:
            keys.append(space.allot)
            payload["part"] = self._part(space)
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
        most `scan` held leases of each partition are looked at, and `Held.complete` says if
        that was all. A tenant's are on its partition; the others are read from each."""
        wanted = {"tenant": tenant_id, "feature": feature_id, "pool": pool}
        spaces = self.spaces if tenant_id is None else (self.tenant_space(tenant_id),)
        found = []
        for space in spaces:
            payload = {
                **self._clock(),
                "lease_prefix": space.lease_prefix,
                "show": show,
                "scan": scan,
                **{name: value for name, value in wanted.items() if value is not None},
            }
            found.append(self.scripts.call("held", [space.leases], payload))
        leases = sorted(
            (lease for reply in found for lease in _as_list(reply["leases"])),
            key=lambda lease: lease.get("e", 0),
        )
        return Held(
            count=sum(int(reply["count"]) for reply in found),
            complete=all(bool(reply["complete"]) for reply in found),
            leases=tuple(leases[:show]),
            now_ms=max(int(reply["now_ms"]) for reply in found),
            waiting=sum(int(reply.get("waiting", 0)) for reply in found),
        )

    # -- the ledger's side: snapshots, recovery, trimming ----------------------------------

    def snapshot(
        self, counter_keys: list[str], *, group: str, space: KeySpace | None = None
    ) -> Snapshot:
        """Counters of one partition and the events of its stream that `group` has not
        acknowledged, at one instant."""
        events = (space or self.keys).events
        reply = self.scripts.call("snapshot", [events, *counter_keys], {"group": group})
        values = tuple(None if v is False else int(v) for v in _as_list(reply["values"]))
        entries = tuple(
            (entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))
            for entry_id, flat in _as_list(reply["entries"])
        )
        return Snapshot(values=values, entries=entries)

    def rebuild(
        self,
        adjustments: list[BudgetAdjustment],
        leases: list[LeaseRestore],
        space: KeySpace | None = None,
    ) -> dict[str, int]:
        """Add to budget counters and write missing leases with their slots, atomically, on
        one partition (the counters and leases given must be that partition's)."""
        space = space or self.keys
        payload = {
            "adjust": [{"by": a.by, "expire_at": a.expire_at_ms} for a in adjustments],
            "leases": [
                {
                    "key": space.lease(r.reservation_id),
                    "id": r.reservation_id,
                    "lease": json.dumps(r.lease, separators=(",", ":")),
                    "e": r.expires_ms,
                    "px": max(1, r.expires_ms - self.now_ms()) + self.retention_ms,
                    "slots": list(r.slots),
                }
                for r in leases
            ],
        }
        keys = [space.leases, *(a.key for a in adjustments)]
        return dict(self.scripts.call("rebuild", keys, payload))

    def trim_events(self) -> int:
        """Drop the usage events that every consumer group has acknowledged, on every
        partition's stream."""
        return sum(int(self.scripts.call("trim", [s.events], {})) for s in self.spaces)

    def allotments_read(
        self, space: KeySpace, checks: list[Check], *, fence: int = 0
    ) -> list[dict[str, Any]]:
        """Of each split limit on one partition: its `units` there, the `amount` they are of,
        the units asked per minute (`want`, smoothed) and the `used` units it must keep
        (allot_move.lua). Resets the asks. `fence`: the round's number, after which the
        partition refuses the moves of an older round."""
        payload = {**self._clock(), "part": self._part(space), "read": True, "fence": fence}
        payload["checks"] = [c.as_lua() for c in checks]
        keys = [space.allot, *(k for c in checks for k in c.redis_keys())]
        return _as_list(self.scripts.call("allot_move", keys, payload))

    def allotments_move(
        self, space: KeySpace, checks: list[Check], units: dict[int, int], *, fence: int = 0
    ) -> dict[int, int] | None:
        """Move split limits on one partition to `units` (by limit id); the units each holds
        now (a budget or concurrency limit keeps what it uses). None, moving nothing, when a
        round numbered after `fence` has read the partition since (0: no fence)."""
        moving = [c for c in checks if c.limit_id in units]
        if not moving:
            return {}
        payload = {**self._clock(), "part": self._part(space), "fence": fence}
        payload["checks"] = [c.as_lua() for c in moving]
        payload["units"] = {str(c.limit_id): units[c.limit_id] for c in moving}
        keys = [space.allot, *(k for c in moving for k in c.redis_keys())]
        reply = self.scripts.call("allot_move", keys, payload)
        if reply == "superseded":
            return None
        return {int(k): int(v) for k, v in dict(reply or {}).items()}

    def spread_429(
        self, space: KeySpace, pool: str, pressure: Pressure, checks: list[Check]
    ) -> float:
        """A provider 429 reported for `pool` on another partition, applied on `space` (see
        spread.lua): its adaptive share decreased, its per-minute buckets emptied. `pressure`
        and `checks`: the pool's settings and own per-minute limits on `space`."""
        payload = {
            **self._clock(),
            "pool": pool,
            "bp": pressure.as_lua(),
            "checks": [c.as_lua() for c in checks],
            "part": self._part(space),
            "maxlen": self.stream_maxlen,
        }
        keys = [pressure.key, space.events, *(k for c in checks for k in c.redis_keys())]
        return float(self.scripts.call("spread", [*keys, space.allot], payload))

    def pressure_state(self, pool_id: int) -> dict[str, float]:
        """A pool's adaptive share and breaker as the scripts keep them (pressure.lua), with
        the engine's time: `share` (1 when never adapted), `open_until_ms` (0: closed). Each
        partition keeps its own, learnt from its own tenants' calls: the share shown is the
        lowest any partition adapted to, the breaker the latest open."""
        shares, opens = [1.0], [0.0]
        for space in self.spaces:
            share, open_until = self.client.hmget(space.pressure(pool_id), "s", "o")
            if share is not None:
                shares.append(float(share))
            if open_until is not None:
                opens.append(float(open_until))
        return {"share": min(shares), "open_until_ms": max(opens), "now_ms": float(self.now_ms())}

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

    def _reserve_payload(self, call: ReserveCall, space: KeySpace) -> dict[str, Any]:
        """ARGV[1] of reserve.lua (see its header)."""
        payload: dict[str, Any] = {
            "version": call.version,
            "id": call.reservation_id,
            "ttl_ms": call.ttl_ms,
            "retention_ms": self.retention_ms,
            "maxlen": self.stream_maxlen,
            "lease_prefix": space.lease_prefix,
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
        if space.count > 1:
            payload["part"] = self._part(space)
        return payload

    def _part(self, space: KeySpace) -> dict[str, Any]:
        """A partition as allot.lua takes it: its number, how many, its allotments' key, and
        the retry while it holds too little of a shared limit (the rebalancer's period)."""
        return {"i": space.index, "n": space.count, "k": space.allot, "r": self.rebalance_ms}

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
        space = self.reservation_space(reservation_id)
        if self.partitioned:  # a settlement refunds split limits at their part now
            payload["part"] = self._part(space)
        keys = [space.version, space.lease(reservation_id), space.leases, space.events]
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
        return Settled(result=reply["result"], spread=reply.get("spread"))

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
