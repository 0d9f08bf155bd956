"""reserve.lua against the script it replaced, side by side: the same calls on the same Redis
state answer the same and leave the same keys, values, expiries and usage events.

`tests/data/lua_before/` holds the scripts as they were before reserve.lua took its request
as a flat array (`lib.lua`, `reserve.lua`, `commit.lua`); `Before` is the engine as it
called them. Each scenario runs once with each engine on an emptied database (13), and
what it leaves is compared: replies as JSON with the text of every number kept, leases
decoded the same way, hashes, sorted sets and streams (entry ids aside, which carry the
real clock), expiries to within a few seconds of real time between the two runs, and every
command the scripts ran with its arguments as Redis got them (`LOG`, put before lib.lua; the
lease's JSON decoded), so that an expiry set a millisecond apart shows too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from quotas.engine import core, scripts
from quotas.engine.core import Engine
from quotas.engine.scripts import LUA_DIR, SCRIPT_NAMES, json_encode, script_source
from quotas.engine.types import (
    Check,
    Owner,
    Period,
    PoolOption,
    ReserveCall,
    Usage,
)

BEFORE = Path(__file__).resolve().parent / "data" / "lua_before"
VERSION = 3
MINUTE = 60_000
TTL_SLACK_MS = 5_000


# Every command a script runs, its arguments as Redis reads them (numbers with 17 digits),
# appended as JSON to the list CALLS (not a key of the decision: the tests run on one node).
CALLS = "calls"
LOG = """
local redis_real = redis
local redis = setmetatable({call = function(...)
  local args = {...}
  for i, arg in ipairs(args) do
    if type(arg) == 'number' then args[i] = string.format('%.17g', arg) end
  end
  redis_real.call('RPUSH', 'calls', cjson.encode(args))
  return redis_real.call(...)
end}, {__index = redis_real})
"""
LOGGED = SCRIPT_NAMES


def logged(engine: Engine, client: redis.Redis, sources: dict[str, str]) -> None:
    for name in LOGGED:
        engine.scripts._scripts[name] = client.register_script(LOG + sources[name])


def before_source(name: str) -> str:
    body = BEFORE / f"{name}.lua"
    if not body.exists():
        body = LUA_DIR / f"{name}.lua"
    return (BEFORE / "lib.lua").read_text() + "\n" + body.read_text()


class Before(Engine):
    """The engine as it called the scripts before: the request as a JSON object with the
    pool options nested in it, and lib.lua, reserve.lua and commit.lua of that time (the
    other scripts as they are, after the lib.lua of that time)."""

    def __init__(self, client: redis.Redis, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        sources = {name: before_source(name) for name in LOGGED}
        logged(self, client, sources)

    def reserve(self, call: ReserveCall) -> Any:
        options = call.options
        option_keys = [
            key
            for option in options
            for check in option.checks
            for key in (*check.redis_keys(), *(k for k, _ in check.guards))
        ]
        options_json = json_encode(
            [{"pool": o.pool, "checks": [c.as_lua() for c in o.checks]} for o in options]
        )
        event_meta = core._event_meta(call.meta)
        head = json_encode(
            {
                "version": call.version,
                "id": call.reservation_id,
                "ttl_ms": call.ttl_ms,
                "retention_ms": self.retention_ms,
                "maxlen": self.stream_maxlen,
                "lease_prefix": self.keys.lease_prefix,
                **self._clock(),
                "idem_hash": call.idempotency_hash if call.idempotency_key else "",
                "in_": call.input_tokens,
                "out": call.max_output_tokens,
                "min_out": call.min_output_tokens,
                "cost": {"a": call.cost_fixed, "b": call.cost_per_output},
                **({"meta": call.meta} if event_meta is None else {}),
            }
        )
        payload = head[:-1] + b',"options":' + options_json + b"}"
        keys = [
            self.keys.version,
            self.keys.lease(call.reservation_id),
            self.keys.leases,
            self.keys.events,
            self._idempotency_key(call),
            *option_keys,
        ]
        reply = self.scripts.call(
            "reserve", keys, payload, core._lease_part(call), *(event_meta or ())
        )
        return self._reserve_result(reply)


def raw_replies(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Records every script's name and JSON reply, with the text of its numbers kept."""
    seen: list[tuple[str, Any]] = []
    names: list[str] = []
    call, decode = engine.scripts.call, scripts.json_decode

    def named(name: str, *args: Any) -> Any:
        names.append(name)
        return call(name, *args)

    def decoded(reply: bytes | str) -> Any:
        seen.append((names[-1], exact(reply)))
        return decode(reply)

    monkeypatch.setattr(engine.scripts, "call", named)
    monkeypatch.setattr(scripts, "json_decode", decoded)
    return seen


def exact(text: bytes | str) -> Any:
    """JSON with every number as its text: 1e+15 and 1000000000000000 differ."""
    return json.loads(text, parse_float=lambda s: ("f", s), parse_int=lambda s: ("i", s))


def calls(client: redis.Redis) -> list[Any]:
    found = []
    for raw in client.lrange(CALLS, 0, -1):
        call = json.loads(raw)
        if call[0] == "SET" and call[1].startswith("q:{equiv}:r:"):
            call[2] = exact(call[2])
        found.append(call)
    client.delete(CALLS)
    return found


def state(client: redis.Redis) -> dict[bytes, Any]:
    found: dict[bytes, Any] = {}
    for key in sorted(client.keys("*")):
        if key == CALLS.encode():
            continue
        kind = client.type(key).decode()
        value: Any
        if kind == "string":
            raw = client.get(key)
            assert raw is not None
            try:
                value = exact(raw)
            except ValueError:
                value = raw
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = [fields for _, fields in client.xrange(key)]
        else:
            raise AssertionError(f"unexpected {kind} at {key!r}")
        found[key] = (kind, value, client.pttl(key))
    return found


def assert_same_state(before: dict[bytes, Any], after: dict[bytes, Any]) -> None:
    assert sorted(before) == sorted(after)
    for key, (kind, value, pttl) in before.items():
        kind_after, value_after, pttl_after = after[key]
        assert (kind_after, value_after) == (kind, value), key
        assert (pttl < 0) == (pttl_after < 0), key
        assert abs(pttl - pttl_after) < TTL_SLACK_MS, key


# -- the plan a scenario reserves against ---------------------------------------------------


class Plan:
    """Checks of the kinds the engine knows, on one engine's key space."""

    def __init__(self, engine: Engine, now: int) -> None:
        self.k = engine.keys
        self.now = now

    def bucket(self, limit: int, cap: int, metric: str = "tokens", **kw: Any) -> Check:
        return Check(limit, "b", metric, cap, key=self.k.bucket(limit), **kw)

    def guarantee(self, limit: int, cap: int, metric: str = "tokens", **kw: Any) -> Check:
        return Check(limit, "g", metric, cap, key=self.k.guarantee(limit), **kw)

    def concurrency(self, limit: int, cap: int, **kw: Any) -> Check:
        return Check(limit, "c", "requests", cap, key=self.k.concurrency(limit), **kw)

    def budget(self, limit: int, cap: int, edge: int, metric: str = "cost_usd", **kw: Any) -> Check:
        """A budget whose current period ends at `edge`, with its neighbours."""
        length = 3_600_000
        starts = (edge - 2 * length, edge - length, edge)
        periods = tuple(Period(self.k.period(limit, s), s, s + length) for s in starts)
        return Check(limit, "p", metric, cap, periods=periods, **kw)


def reserve_call(
    rid: str,
    options: tuple[PoolOption, ...],
    *,
    input_tokens: int = 100,
    out: int = 100,
    min_out: int | None = None,
    ttl_ms: int = 3_600_000,
    meta: dict[str, Any] | None = None,
    idem: str = "",
    body: str = "h",
    version: int = VERSION,
    cost_per_output: float = 600.0,
) -> ReserveCall:
    return ReserveCall(
        reservation_id=rid,
        version=version,
        tenant_id=7,
        feature_id=8,
        options=options,
        input_tokens=input_tokens,
        max_output_tokens=out,
        min_output_tokens=out if min_out is None else min_out,
        cost_fixed=15_000,
        cost_per_output=cost_per_output,
        prices=(150.0, 0.1234567890123456, 600.123456789012345),
        ttl_ms=ttl_ms,
        meta={"tenant": "acme", "feature": "chat", "model": "m", "key": "k1"}
        if meta is None
        else meta,
        idempotency_key=idem,
        idempotency_hash=body,
    )


Scenario = Callable[[Engine, Plan], list[Any]]


def grants(engine: Engine, p: Plan) -> list[Any]:
    """The benchmark's plan: a budget and three buckets; grants, with and without a key."""
    opts = (
        PoolOption(
            "pool",
            (
                p.budget(4, 10**15, p.now + 5_000),
                p.bucket(3, 10**12),
                p.bucket(2, 10**12, "requests"),
                p.bucket(1, 10**12),
            ),
        ),
    )
    results = [engine.reserve(reserve_call(f"rsv_{n}", opts)) for n in range(3)]
    results.append(engine.reserve(reserve_call("rsv_k", opts, idem="key-1")))
    results.append(engine.reserve(reserve_call("rsv_m", opts, input_tokens=0, out=0)))
    return results


def partial_and_refusals(engine: Engine, p: Plan) -> list[Any]:
    """Partial grants, then every kind of refusal, the slowest deciding; a pool after one
    that refuses; a request that can never fit."""
    tight = PoolOption("tight", (p.bucket(11, 1_000), p.concurrency(12, 2)))
    budget = PoolOption(
        "budget", (p.budget(13, 2_000_000, p.now + 9_000), p.bucket(14, 10**6, "output_tokens"))
    )
    results: list[Any] = []
    for n in range(4):
        results.append(engine.reserve(reserve_call(f"rsv_p{n}", (tight,), out=700, min_out=50)))
    results.append(engine.reserve(reserve_call("rsv_b0", (budget,), out=1000, min_out=10)))
    results.append(engine.reserve(reserve_call("rsv_b1", (budget,), out=5000, min_out=4000)))
    results.append(engine.reserve(reserve_call("rsv_two", (tight, budget), out=1000, min_out=1)))
    results.append(engine.reserve(reserve_call("rsv_never", (tight,), out=10**6)))
    results.append(
        engine.reserve(reserve_call("rsv_prices", (budget,), out=77, cost_per_output=12.3))
    )
    results.append(engine.reserve(reserve_call("rsv_b2", (budget,), out=2000)))
    engine.frozen_ms = p.now + 2 * MINUTE
    results.append(engine.reserve(reserve_call("rsv_later", (tight, budget), out=200)))
    return results


def soft_and_shadow(engine: Engine, p: Plan) -> list[Any]:
    opts = (
        PoolOption(
            "soft",
            (
                p.bucket(21, 150, enforcement="soft"),
                p.bucket(22, 10**9),
                p.bucket(23, 120, "requests", enforcement="shadow"),
                p.budget(24, 10, p.now + 1, "tokens", enforcement="soft"),
            ),
        ),
    )
    return [engine.reserve(reserve_call(f"rsv_s{n}", opts, out=40)) for n in range(4)]


def idempotency_and_stale(engine: Engine, p: Plan) -> list[Any]:
    opts = (PoolOption("pool", (p.bucket(31, 10**6), p.concurrency(32, 5))),)
    return [
        engine.reserve(reserve_call("rsv_i0", opts, idem="k", body="one")),
        engine.reserve(reserve_call("rsv_i1", opts, idem="k", body="one")),
        engine.reserve(reserve_call("rsv_i2", opts, idem="k", body="two")),
        engine.reserve(reserve_call("rsv_st", opts, version=VERSION - 1)),
        engine.reserve(reserve_call("rsv_i3", opts, idem="other", body="one")),
    ]


def reaping_and_period_edge(engine: Engine, p: Plan) -> list[Any]:
    """Leases expire and are reaped by later reserves; a budget's period ends between them."""
    opts = (
        PoolOption(
            "pool",
            (p.budget(41, 10**6, p.now + 1_000, "tokens"), p.concurrency(42, 3)),
        ),
    )
    results = [engine.reserve(reserve_call(f"rsv_r{n}", opts, ttl_ms=500 + n)) for n in range(3)]
    results.append(engine.reserve(reserve_call("rsv_full", opts)))
    engine.frozen_ms = p.now + 999
    results.append(engine.reserve(reserve_call("rsv_edge0", opts, ttl_ms=10_000)))
    engine.frozen_ms = p.now + 1_000
    results.append(engine.reserve(reserve_call("rsv_edge1", opts, ttl_ms=10_000)))
    engine.frozen_ms = p.now + 20_000
    results.append(engine.reserve(reserve_call("rsv_after", opts)))
    engine.frozen_ms = p.now + 40_000
    late = Usage(100, 10, body_hash="z", extra={"latency_ms": "12"})
    owner = Owner(7)
    results.append(
        engine.commit(reservation_id="rsv_edge0", owner=owner, usage=late, version=VERSION)
    )
    results.append(engine.reap())
    results.append(engine.release(reservation_id="rsv_edge1", owner=owner, version=VERSION))
    return results


def guarantees_and_floors(engine: Engine, p: Plan) -> list[Any]:
    """A feature's guarantee drained first; others kept above the unspent guarantees and
    above a floor for higher priorities."""
    pool = 51
    own = (PoolOption("g", (p.guarantee(52, 300), p.bucket(pool, 1_000))),)
    guards = ((p.k.guarantee(52), 300),)
    other = (PoolOption("g", (p.bucket(pool, 1_000, floor=200, guards=guards),)),)
    results: list[Any] = []
    results.append(engine.reserve(reserve_call("rsv_o0", other, out=200, min_out=1)))
    results.append(engine.reserve(reserve_call("rsv_g0", own, out=250, min_out=1)))
    results.append(engine.reserve(reserve_call("rsv_o1", other, out=300, min_out=1)))
    results.append(engine.reserve(reserve_call("rsv_g1", own, out=250, min_out=1)))
    results.append(engine.reserve(reserve_call("rsv_o2", other, out=300, min_out=200)))
    engine.frozen_ms = p.now + 7_000
    results.append(engine.reserve(reserve_call("rsv_o3", other, out=100, min_out=1)))
    results.append(engine.reserve(reserve_call("rsv_g2", own, out=10, min_out=1)))
    engine.frozen_ms = p.now + 30_001
    results.append(engine.reserve(reserve_call("rsv_o4", other, out=100, min_out=1)))
    results.append(engine.reserve(reserve_call("rsv_never", other, out=10**4, min_out=10**4)))
    return results


def no_limits_and_metas(engine: Engine, p: Plan) -> list[Any]:
    """A pool with no limits; meta fields sent ready for XADD and written by the script."""
    bare = (PoolOption("bare", ()),)
    opts = (PoolOption("pool", (p.bucket(61, 10**6), p.bucket(62, 10**6, "input_tokens"))),)
    metas: list[dict[str, Any]] = [
        {},
        {"tenant": "t", "metadata": '{"a":"é/x"}', "estimated": 1, "pool": "theirs"},
        {"x": 1.5, "y": True, "n": False, "f": 3.0, "v": 0.1234567890123456},
        {"big": 2**60, "huge": 1e20, "ü": "ñ", "max": 2**53 - 1},
        {"type": "theirs", "rid": "r", "would_refuse": "q", "expires_ms": 5, "reason": "x"},
        {"st": "held", "x": '"st":"held"'},
    ]
    results: list[Any] = [engine.reserve(reserve_call("rsv_bare", bare))]
    for n, meta in enumerate(metas):
        results.append(engine.reserve(reserve_call(f"rsv_meta{n}", opts, meta=meta)))
        results.append(engine.reserve(reserve_call(f"rsv_x{n}", opts, out=10**7, meta=meta)))
    return results


def and_then_settled(engine: Engine, p: Plan) -> list[Any]:
    """What commit, release, extend and peek read back from the leases reserve wrote."""
    opts = (
        PoolOption(
            "pool",
            (
                p.budget(71, 10**12, p.now + 50_000),
                p.bucket(72, 10**6),
                p.concurrency(73, 4),
                p.guarantee(74, 500),
                p.bucket(75, 10**4, "requests", enforcement="soft"),
            ),
        ),
    )
    owner = Owner(7)
    results: list[Any] = []
    for n in range(4):
        results.append(engine.reserve(reserve_call(f"rsv_c{n}", opts, idem=f"i{n}")))
    usage = Usage(100, 40, cached_input_tokens=20, body_hash="x", extra={"finish_reason": "stop"})
    results.append(
        engine.commit(reservation_id="rsv_c0", owner=owner, usage=usage, version=VERSION)
    )
    results.append(
        engine.commit(reservation_id="rsv_c0", owner=owner, usage=usage, version=VERSION)
    )
    results.append(engine.release(reservation_id="rsv_c1", owner=owner, version=VERSION))
    results.append(
        engine.extend(reservation_id="rsv_c2", owner=owner, ttl_ms=90_000, version=VERSION)
    )
    results.append(engine.peek(reservation_id="rsv_c2", owner=owner, version=VERSION))
    big = Usage(500, 5_000, body_hash="y")
    results.append(engine.commit(reservation_id="rsv_c3", owner=owner, usage=big, version=VERSION))
    results.append(engine.reserve(reserve_call("rsv_c0", opts, idem="i0")))
    return results


SCENARIOS: list[Scenario] = [
    grants,
    partial_and_refusals,
    soft_and_shadow,
    idempotency_and_stale,
    reaping_and_period_edge,
    guarantees_and_floors,
    no_limits_and_metas,
    and_then_settled,
]


def run(engine: Engine, client: redis.Redis, scenario: Scenario, now: int) -> dict[str, Any]:
    client.flushdb()
    client.set(engine.keys.version, VERSION)
    engine.frozen_ms = now
    with pytest.MonkeyPatch.context() as patch:
        replies = raw_replies(engine, patch)
        results = scenario(engine, Plan(engine, now))
    return {
        "results": results,
        "replies": replies,
        "state": state(client),
        "calls": calls(client),
    }


# One engine of each kind for the module: an engine keeps connections of the client's pool.
ENGINES: dict[tuple[str, int], Engine] = {}


def engine_for(kind: str, client: redis.Redis, maxlen: int) -> Engine:
    engine = ENGINES.get((kind, maxlen))
    if engine is None or engine.client is not client:
        options: dict[str, Any] = {"hash_tag": "equiv", "stream_maxlen": maxlen}
        if kind == "before":
            engine = Before(client, **options)
        else:
            engine = Engine(client, **options)
            logged(engine, client, {name: script_source(name) for name in LOGGED})
        ENGINES[kind, maxlen] = engine
    return engine


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("maxlen", [0, 1000])
def test_reserve_answers_and_writes_what_it_did_before(
    redis_db: redis.Redis, scenario: Scenario, maxlen: int
) -> None:
    seconds, micros = redis_db.time()
    now = seconds * 1000 + micros // 1000
    before = run(engine_for("before", redis_db, maxlen), redis_db, scenario, now)
    after = run(engine_for("after", redis_db, maxlen), redis_db, scenario, now)
    assert after["results"] == before["results"]
    assert after["calls"] == before["calls"]
    assert after["replies"] == before["replies"]
    assert_same_state(before["state"], after["state"])
    # the scenarios reach what they are about
    assert [name for name, _ in after["replies"]].count("reserve") >= 3
