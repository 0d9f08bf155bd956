"""The engine: one EVALSHA per decision, typed results."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import redis

from quotas.engine.scripts import Scripts, json_encode
from quotas.engine.types import (
    BudgetAdjustment,
    Check,
    Conflict,
    Existing,
    Granted,
    Held,
    LeaseRestore,
    LeaseView,
    LimitState,
    Missing,
    Owner,
    PoolOption,
    Refused,
    ReserveCall,
    Settled,
    Snapshot,
    Stale,
    Usage,
)

Reply = dict[str, Any]
ENCODED_OPTIONS_KEPT = 4096


class KeySpace:
    """Every key carries one hash tag, so a decision's keys share a Redis Cluster slot."""

    def __init__(self, tag: str) -> None:
        self.prefix = f"q:{{{tag}}}:"
        self.version = self.prefix + "config_version"
        self.leases = self.prefix + "leases"
        self.events = self.prefix + "events"
        self.lease_prefix = self.prefix + "r:"

    def lease(self, reservation_id: str) -> str:
        return self.lease_prefix + reservation_id

    def idempotency(self, tenant_id: int, key: str) -> str:
        return f"{self.prefix}idem:{tenant_id}:{key}"

    def bucket(self, limit_id: int) -> str:
        return f"{self.prefix}b:{limit_id}"

    def guarantee(self, limit_id: int) -> str:
        return f"{self.prefix}g:{limit_id}"

    def concurrency(self, limit_id: int) -> str:
        return f"{self.prefix}c:{limit_id}"

    def period(self, limit_id: int, start_ms: int) -> str:
        return f"{self.prefix}p:{limit_id}:{start_ms}"


class Engine:
    def __init__(
        self,
        client: redis.Redis,
        *,
        hash_tag: str,
        retention_ms: int = 86_400_000,
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
        # id(options) -> (options, their limit keys, their JSON): see _options_encoded
        self._encoded: dict[int, tuple[tuple[PoolOption, ...], list[str], bytes]] = {}

    def reserve(self, call: ReserveCall) -> Granted | Refused | Existing | Conflict | Stale:
        option_keys, options_json = self._options_encoded(call.options)
        keys = [
            self.keys.version,
            self.keys.lease(call.reservation_id),
            self.keys.leases,
            self.keys.events,
            self._idempotency_key(call),
            *option_keys,
        ]
        event_meta = _event_meta(call.meta)
        reply = self.scripts.call(
            "reserve",
            keys,
            self._reserve_payload(call, options_json, event_meta is None),
            _lease_part(call),
            *(event_meta or ()),
        )
        return self._reserve_result(reply)

    def _options_encoded(self, options: tuple[PoolOption, ...]) -> tuple[list[str], bytes]:
        """The limit keys of a reservation's pool options, and the options as the end of
        reserve.lua's request array (its JSON from the number of options on, without the
        brackets). The plan hands out the same options object for a feature, model and
        priority until it changes, so both are kept for that object rather than built on
        every reserve."""
        hit = self._encoded.get(id(options))
        if hit is not None and hit[0] is options:
            return hit[1], hit[2]
        keys = [
            key
            for option in options
            for check in option.checks
            for key in (*check.redis_keys(), *(k for k, _ in check.guards))
        ]
        flat: list[Any] = [len(options)]
        for option in options:
            flat += (option.pool, len(option.checks))
            for check in option.checks:
                flat += _check_flat(check)
        text = json_encode(flat)[1:-1]
        if len(self._encoded) >= ENCODED_OPTIONS_KEPT:
            self._encoded.clear()
        self._encoded[id(options)] = (options, keys, text)
        return keys, text

    def commit(
        self, *, reservation_id: str, owner: Owner, usage: Usage, version: int | None
    ) -> Settled | Conflict | Missing | Stale:
        payload = self._owner_payload(owner, version)
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
        self, *, reservation_id: str, owner: Owner, version: int | None
    ) -> Settled | Conflict | Missing | Stale:
        payload = self._owner_payload(owner, version)
        return self._settle_result(self._lease_call("release", reservation_id, payload))

    def extend(
        self, *, reservation_id: str, owner: Owner, ttl_ms: int, version: int | None
    ) -> LeaseView | Conflict | Missing | Stale:
        payload = self._owner_payload(owner, version)
        payload["ttl_ms"] = ttl_ms
        return self._lease_result(self._lease_call("extend", reservation_id, payload))

    def peek(
        self, *, reservation_id: str, owner: Owner, version: int | None
    ) -> LeaseView | Conflict | Missing | Stale:
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

    def _reserve_payload(self, call: ReserveCall, options_json: bytes, with_meta: bool) -> bytes:
        """ARGV[1] of reserve.lua, a flat array (see its header); `meta` only when the events'
        meta fields cannot be sent ready for XADD (see `_event_meta`)."""
        head = json_encode(
            [
                call.version,
                call.reservation_id,
                call.ttl_ms,
                self.retention_ms,
                self.stream_maxlen,
                self.keys.lease_prefix,
                False if self.frozen_ms is None else self.frozen_ms,
                self.clock_offset_ms,
                call.idempotency_hash if call.idempotency_key else "",
                call.input_tokens,
                call.max_output_tokens,
                call.min_output_tokens,
                call.cost_fixed,
                call.cost_per_output,
                call.meta if with_meta else False,
            ]
        )
        return head[:-1] + b"," + options_json + b"]"

    def _owner_payload(self, owner: Owner, version: int | None) -> dict[str, Any]:
        return {
            "version": version,
            "tenant": owner.tenant_id,
            "features": list(owner.feature_ids),
            "maxlen": self.stream_maxlen,
            "retention_ms": self.retention_ms,
            **self._clock(),
        }

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
    def _reserve_result(reply: Reply) -> Granted | Refused | Existing | Conflict | Stale:
        if reply.get("stale"):
            return Stale()
        if reply.get("conflict"):
            return Conflict(state="idempotency")
        if "existing" in reply:
            lease = LeaseView(data=reply["existing"], now_ms=reply["now_ms"])
            return Existing(lease=lease, granted=_granted(reply["existing"]["reply"]))
        if reply["granted"]:
            return _granted(reply)
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
    def _settle_result(reply: Reply) -> Settled | Conflict | Missing | Stale:
        if reply.get("stale"):
            return Stale()
        if reply.get("missing"):
            return Missing()
        if "conflict" in reply:
            return Conflict(state=reply["conflict"])
        return Settled(result=reply["result"])

    @staticmethod
    def _lease_result(reply: Reply) -> LeaseView | Conflict | Missing | Stale:
        if reply.get("stale"):
            return Stale()
        if reply.get("missing"):
            return Missing()
        if "conflict" in reply:
            return Conflict(state=reply["conflict"])
        return LeaseView(data=reply["lease"], now_ms=int(reply["now_ms"]))


def _granted(reply: Reply) -> Granted:
    return Granted(
        reservation_id=reply["id"],
        pool=reply["pool"],
        output_tokens=int(reply["out"]),
        cost_nusd=int(reply["cost"]),
        expires_ms=int(reply["expires_ms"]),
        now_ms=int(reply["now_ms"]),
        limits=tuple(
            LimitState(
                limit_id=d["id"],
                cap=int(d["cap"]),
                remaining=d["remaining"],
                reset_ms=d.get("reset_ms"),
            )
            for d in _as_list(reply["limits"])
        ),
        would_refuse=tuple(_as_list(reply["soft"])),
    )


def _check_flat(check: Check) -> list[Any]:
    """One check as reserve.lua reads it from its request array (see its header): the
    numbers it computes with as they are, and the heads of its entries in the answer's
    `limits` and in the lease's `ck`, written as cjson wrote those members."""
    cap = _cjson_number(check.cap)
    limit_head = f'{{"id":{_cjson_number(check.limit_id)},"cap":{cap},"remaining":'
    lease_head = f'{{"kind":{json.dumps(check.kind)},"m":{json.dumps(check.metric)},"cap":{cap},'
    if check.kind != "p":  # a budget's key is the period's, which the script picks
        lease_head += f'"k":{json.dumps(check.key)},'
    flat: list[Any] = [
        check.kind,
        check.enforcement,
        check.metric,
        check.limit_id,
        check.cap,
        check.floor,
        limit_head,
        lease_head + '"amt":',
        check.key or False,
        len(check.periods),
    ]
    for period in check.periods:
        flat += (period.key, period.start_ms, period.stop_ms)
    flat.append(len(check.guards))
    for key, cap_kept in check.guards:
        flat += (key, cap_kept)
    return flat


def _cjson_number(value: int | float) -> str:
    """A number as cjson writes it: the double it reads as, with 14 significant digits."""
    return f"{float(value):.14g}"


def _lease_part(call: ReserveCall) -> bytes:
    """The part of a new lease's JSON that the request alone decides (ARGV[2] of
    reserve.lua): its members from `id` to the open `meta` object, which the script closes
    with the pool it granted from. The script decodes none of it and writes it as is, so
    its numbers are written as cjson would have written them (see `_as_cjson`). All but
    the id is the same for every call of a feature, model, key and ttl: kept once made."""
    return b'"id":' + json_encode(call.reservation_id) + b"," + _lease_rest(call)


LEASE_RESTS_KEPT = 4096
MEMO_TYPES = (str, int, bool)
_lease_rests: dict[tuple[Any, ...], bytes] = {}


def _lease_rest(call: ReserveCall) -> bytes:
    meta = {name: value for name, value in call.meta.items() if name != "pool"}
    memo: tuple[Any, ...] | None = None
    # Kept only for plain text, whole numbers and booleans (with their types: 1 and True are
    # equal keys but not the same JSON), and prices by their repr (0.0 and -0.0 are equal
    # too); a caller's metadata differs call by call, not worth keeping.
    if "metadata" not in meta and all(type(v) in MEMO_TYPES for v in meta.values()):
        memo = (
            call.tenant_id,
            call.feature_id,
            call.ttl_ms,
            repr(call.prices),
            *((name, type(value), value) for name, value in meta.items()),
        )
        kept = _lease_rests.get(memo)
        if kept is not None:
            return kept
    rest = json_encode(
        _as_cjson(
            {
                "tenant": call.tenant_id,
                "feature": call.feature_id,
                "ttl_ms": call.ttl_ms,
                "prices": dict(zip("ico", call.prices, strict=True)),
                "meta": meta,
            }
        )
    )
    # drop the opening brace, the closing braces of `meta` and the lease; a comma when more
    # members follow
    rest = rest[1:-2] + (b"," if meta else b"")
    if memo is not None:
        if len(_lease_rests) >= LEASE_RESTS_KEPT:
            _lease_rests.clear()
        _lease_rests[memo] = rest
    return rest


# Fields the reserved and refused events set themselves (a meta field of the same name
# would take their place or give way to them).
EVENT_OWN_FIELDS = frozenset(
    {
        "type",
        "rid",
        "at_ms",
        "created_ms",
        "reserved_input_tokens",
        "reserved_output_tokens",
        "reserved_cost_nusd",
        "would_refuse",
        "granted_output_tokens",
        "expires_ms",
        "pool",
        "reason",
        "limit",
    }
)
TWO_TO_53 = 2**53


def _event_meta(meta: dict[str, Any]) -> list[str] | None:
    """The meta fields of a reservation's usage events as reserve.lua wrote them (ARGV[3..]:
    name, value, ...): strings as they are, whole numbers without exponent or fraction,
    other numbers with 14 significant digits, booleans as true or false. None when some
    field is named as one the event sets itself, or some name or value is another type or
    not plain UTF-8 text, or a number is not finite or past 2**53: the script then reads
    `meta` from the request and writes the fields itself."""
    flat: list[str] = []
    for name, value in meta.items():
        if not isinstance(name, str) or name in EVENT_OWN_FIELDS or not _utf8(name):
            return None
        if isinstance(value, str):
            if not _utf8(value):
                return None
            text = value
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            if not -TWO_TO_53 < value < TWO_TO_53:
                return None
            text = str(value)
        elif isinstance(value, float):
            if not math.isfinite(value) or not -TWO_TO_53 < value < TWO_TO_53:
                return None
            text = f"{value:.0f}" if value == math.floor(value) else f"{value:.14g}"
        else:
            return None
        flat += (name, text)
    return flat


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _as_cjson(value: Any) -> Any:
    """`value` as cjson reads and writes it again: every number a double written with 14
    significant digits, so whole numbers below 10**14 as integers (150.0 as 150) and others
    as the float the 14 digits read back as (orjson writes it in its shortest form, which
    reads back to the same double)."""
    if isinstance(value, dict):
        return {name: _as_cjson(item) for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [_as_cjson(item) for item in value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    if isinstance(value, int) and -(10**14) < value < 10**14:
        return value
    number = float(value)
    if not math.isfinite(number):
        return number
    if number.is_integer() and -(10**14) < number < 10**14 and number != 0:
        return int(number)  # -0.0 stays a float: cjson writes it -0
    return float(f"{number:.14g}")


def _as_list(value: Any) -> list[Any]:
    """Lua's cjson writes an empty array as {}."""
    return list(value) if isinstance(value, list) else []
