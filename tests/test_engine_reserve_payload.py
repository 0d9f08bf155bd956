"""reserve.lua's lease and events: the meta fields sent ready for XADD (ARGV[3..]) and the
lease members sent as JSON (ARGV[2]) store what the script wrote from the decoded request."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
import redis

from quotas.engine import core
from quotas.engine.core import Engine
from quotas.engine.types import Check, Owner, Period, PoolOption, ReserveCall, Usage

NOW = 1_795_911_325_511
METAS: list[dict[str, Any]] = [
    {},
    {
        "tenant": "acme",
        "feature": "chat",
        "model": "m",
        "priority": "interactive",
        "key": "6abcc1272f35",
        "estimated": 0,
    },
    {"tenant": "t", "metadata": '{"a":"é/x"}', "estimated": 1, "pool": "theirs"},
    {"x": 1.5, "y": True, "n": False, "f": 3.0, "neg": -0.0, "v": 0.1234567890123456},
    {"big": 2**60, "huge": 1e20, "ü": "ñ", "max": 2**53 - 1},
    {"type": "theirs", "rid": "r", "would_refuse": "q", "expires_ms": 5, "reason": "x"},
]


@pytest.fixture
def engine(redis_db: redis.Redis) -> Engine:
    engine = Engine(redis_db, hash_tag="payload", retention_ms=86_400_000)
    engine.frozen_ms = NOW
    redis_db.set(engine.keys.version, 3)
    return engine


def options(engine: Engine, tokens_cap: int) -> tuple[PoolOption, ...]:
    keys = engine.keys
    return (
        PoolOption("first", (Check(1, "b", "tokens", 50, key=keys.bucket(1)),)),
        PoolOption(
            "second",
            (
                Check(
                    4, "p", "cost_usd", 10**15 + 7, periods=(Period(keys.period(4, 1), 1, NOW + 1),)
                ),
                Check(3, "b", "tokens", tokens_cap, key=keys.bucket(3), enforcement="soft"),
                Check(5, "c", "requests", 3, key=keys.concurrency(5)),
                Check(6, "g", "tokens", 300, key=keys.guarantee(6)),
                Check(
                    2,
                    "b",
                    "requests",
                    10**12,
                    key=keys.bucket(2),
                    guards=((keys.guarantee(9), 40),),
                ),
            ),
        ),
    )


def call(
    engine: Engine, rid: str, meta: dict[str, Any], *, hard_cap: bool, tokens_cap: int
) -> ReserveCall:
    opts = options(engine, tokens_cap)
    if hard_cap:  # the second pool refuses too
        opts = (
            opts[0],
            PoolOption("second", (Check(7, "b", "tokens", 5, key=engine.keys.bucket(7)),)),
        )
    return ReserveCall(
        reservation_id=rid,
        version=3,
        tenant_id=7,
        feature_id=8,
        options=opts,
        input_tokens=100,
        max_output_tokens=100,
        min_output_tokens=10,
        cost_fixed=15_000,
        cost_per_output=600.0,
        prices=(150.0, 0.1234567890123456, 600.123456789012345),
        ttl_ms=3_600_000,
        meta=dict(meta),
        idempotency_key=f"idem-{rid}",
        idempotency_hash="h",
    )


def events(client: redis.Redis, engine: Engine) -> list[dict[str, str]]:
    return [
        {name.decode(): value.decode() for name, value in fields.items()}
        for _, fields in client.xrange(engine.keys.events)
    ]


def run(engine: Engine, client: redis.Redis, meta: dict[str, Any]) -> dict[str, Any]:
    """A grant (with a soft limit over), a replay, a commit, and a refusal; what they left."""
    client.flushdb()
    client.set(engine.keys.version, 3)
    granted = engine.reserve(call(engine, "rsv_a", meta, hard_cap=False, tokens_cap=150))
    replay = engine.reserve(call(engine, "rsv_a", meta, hard_cap=False, tokens_cap=150))
    lease = json.loads(client.get(engine.keys.lease("rsv_a")) or "")
    engine.commit(
        reservation_id="rsv_a",
        owner=Owner(7),
        usage=Usage(100, 50, body_hash="x", extra={"finish_reason": "stop"}),
        version=3,
    )
    refused = engine.reserve(call(engine, "rsv_b", meta, hard_cap=True, tokens_cap=150))
    committed = json.loads(client.get(engine.keys.lease("rsv_a")) or "")
    return {
        "granted": granted,
        "replay": replay,
        "refused": refused,
        "lease": lease,
        "committed": committed,
        "events": events(client, engine),
    }


@pytest.mark.parametrize("meta", METAS)
def test_meta_sent_ready_for_xadd_writes_what_the_script_would(
    engine: Engine, redis_db: redis.Redis, meta: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = run(engine, redis_db, meta)
    monkeypatch.setattr(core, "_event_meta", lambda meta: None)
    slow = run(engine, redis_db, meta)
    assert fast == slow
    if "type" in meta:  # a meta field takes the place of the event's own (as it always did)
        return
    assert fast["events"][0]["type"] == "reserved"
    assert fast["events"][0]["pool"] == "second"
    assert fast["events"][0]["would_refuse"] == "3"
    assert [e["type"] for e in fast["events"]] == ["reserved", "committed", "refused"]


def test_fallback_is_taken_only_when_needed() -> None:
    assert core._event_meta({"a": "x", "b": 1, "c": True, "d": 1.5, "e": 2.0}) == [
        "a", "x", "b", "1", "c", "true", "d", "1.5", "e", "2",
    ]  # fmt: skip
    for meta in (
        {"type": "x"},
        {"pool": "p"},
        {"n": None},
        {"d": {}},
        {"i": 2**53},
        {"f": float("nan")},
    ):
        assert core._event_meta(meta) is None


def test_lease_members_read_as_cjson_wrote_them(engine: Engine, redis_db: redis.Redis) -> None:
    meta = {"tenant": "acme", "pool": "theirs", "big": 2**60, "v": 0.1234567890123456}
    engine.reserve(call(engine, "rsv_c", meta, hard_cap=False, tokens_cap=1000))
    lease = json.loads(redis_db.get(engine.keys.lease("rsv_c")) or "")
    # what the script stored when it decoded the request and encoded the lease itself
    written = redis_db.eval(
        "return cjson.encode(cjson.decode(ARGV[1]))",
        0,
        json.dumps(
            {
                "prices": {"i": 150.0, "c": 0.1234567890123456, "o": 600.123456789012345},
                "meta": meta,
            }
        ),
    )
    expected = json.loads(written)
    expected["meta"]["pool"] = "second"
    assert lease["prices"] == expected["prices"]
    assert lease["meta"] == expected["meta"]
    assert {name: lease[name] for name in ("id", "tenant", "feature", "ttl_ms", "st", "pool")} == {
        "id": "rsv_c",
        "tenant": 7,
        "feature": 8,
        "ttl_ms": 3_600_000,
        "st": "held",
        "pool": "second",
    }
    assert lease["created"] == NOW and lease["e"] == NOW + 3_600_000
    assert lease["r"] == {"in_": 100, "out": 100, "cost": 75_000}
    assert [c["k"] for c in lease["ck"]] == [
        engine.keys.period(4, 1),
        engine.keys.bucket(3),
        engine.keys.concurrency(5),
        engine.keys.guarantee(6),
        engine.keys.bucket(2),
    ]


@pytest.mark.parametrize("meta", [{"tenant": "acme"}, {"st": "held"}, {"x": '"st":"held"'}])
def test_a_settled_lease_is_the_held_one_with_its_settlement(
    engine: Engine, redis_db: redis.Redis, meta: dict[str, Any]
) -> None:
    engine.reserve(call(engine, "rsv_d", meta, hard_cap=False, tokens_cap=1000))
    held = json.loads(redis_db.get(engine.keys.lease("rsv_d")) or "")
    engine.frozen_ms = NOW + 5
    settled = engine.commit(
        reservation_id="rsv_d", owner=Owner(7), usage=Usage(100, 50, body_hash="x"), version=3
    )
    lease = json.loads(redis_db.get(engine.keys.lease("rsv_d")) or "")
    assert isinstance(settled, core.Settled)
    assert lease == {**held, "st": "committed", "done": NOW + 5, "res": settled.result, "hash": "x"}
    assert (
        settled.result["cost_nusd"] == 45_007 and settled.result["refunded"]["output_tokens"] == 50
    )


@pytest.mark.parametrize("meta", METAS)
def test_the_kept_lease_part_is_what_a_fresh_encoding_writes(
    engine: Engine, meta: dict[str, Any]
) -> None:
    core._lease_rests.clear()
    first = core._lease_part(call(engine, "rsv_1", meta, hard_cap=False, tokens_cap=150))
    second = core._lease_part(call(engine, "rsv_2", meta, hard_cap=False, tokens_cap=150))
    kept = "metadata" not in meta and all(type(v) in (str, int, bool) for v in meta.values())
    assert len(core._lease_rests) == (1 if kept else 0)

    whole = {"id": "rsv_2", "tenant": 7, "feature": 8, "ttl_ms": 3_600_000}
    whole["prices"] = {"i": 150.0, "c": 0.1234567890123456, "o": 600.123456789012345}
    whole["meta"] = {name: value for name, value in meta.items() if name != "pool"}
    fresh = core.json_encode(core._as_cjson(whole))
    assert second == fresh[1:-2] + (b"," if whole["meta"] else b"")
    assert first == second.replace(b'"rsv_2"', b'"rsv_1"', 1)


def test_equal_values_of_other_types_are_not_taken_for_one_another(engine: Engine) -> None:
    core._lease_rests.clear()
    parts = [
        core._lease_part(call(engine, "rsv_1", {"v": value}, hard_cap=False, tokens_cap=150))
        for value in (1, True, 1.5, 1.0)
    ]
    assert [part.rsplit(b'"v":', 1)[1] for part in parts] == [b"1,", b"true,", b"1.5,", b"1,"]
    assert len(core._lease_rests) == 2  # floats are not kept: 0.0 and -0.0 are equal keys


def test_prices_equal_but_written_otherwise_are_not_taken_for_one_another(engine: Engine) -> None:
    core._lease_rests.clear()
    zero = replace(call(engine, "rsv_1", {}, hard_cap=False, tokens_cap=150), prices=(0.0, 1, 2))
    minus = replace(zero, prices=(-0.0, 1, 2))
    assert b'"i":0' in core._lease_part(zero)
    assert b'"i":-0' in core._lease_part(minus)
