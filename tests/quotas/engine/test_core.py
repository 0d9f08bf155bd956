"""The engine's scripts called directly against the real Redis: what a decision stores (the
lease, the usage events, the limit keys) and that each decision is one round trip."""

from __future__ import annotations

import json
import time
from typing import Any, cast

import pytest
import redis

from quotas.engine import Engine
from quotas.engine.scripts import script_source
from quotas.engine.types import (
    Check,
    Conflict,
    Existing,
    Granted,
    KeyHolder,
    LeaseView,
    Missing,
    Owner,
    Period,
    PoolOption,
    Refused,
    ReserveCall,
    Settled,
    Stale,
    Usage,
)
from tests.fixtures import store_client

# a day from now, so that counters expiring past their period still exist
NOW = (int(time.time()) + 86_400) * 1000
HOUR = 3_600_000
OWNER = Owner(7)


class Counting(redis.Redis):
    """A client that notes the name of every command it sends (`counting`)."""

    sent: list[str]


def counting(client: redis.Redis) -> Counting:
    """Note the name of every command `client` sends, in `client.sent`."""
    sent: list[str] = []
    send = client.execute_command

    def execute_command(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]))
        return send(*args, **options)

    client.execute_command = execute_command  # type: ignore[method-assign]
    client.sent = sent  # type: ignore[attr-defined]
    return cast(Counting, client)


@pytest.fixture
def client(redis_db: redis.Redis) -> Counting:
    return counting(store_client())


@pytest.fixture
def engine(client: Counting) -> Engine:
    engine = Engine(client, hash_tag="engine-test", retention_ms=HOUR)
    engine.frozen_ms = NOW
    client.set(engine.keys.version, 3)
    return engine


def bucket(engine: Engine, limit_id: int, cap: int, **kw: Any) -> Check:
    return Check(
        limit_id, "b", kw.pop("metric", "tokens"), cap, key=engine.keys.bucket(limit_id), **kw
    )


def budget(engine: Engine, limit_id: int, cap: int) -> Check:
    period = Period(engine.keys.period(limit_id, NOW - HOUR), NOW - HOUR, NOW + HOUR)
    return Check(limit_id, "p", "cost_usd", cap, periods=(period,))


def slots(engine: Engine, limit_id: int, cap: int) -> Check:
    return Check(limit_id, "c", "requests", cap, key=engine.keys.concurrency(limit_id))


def call(rid: str, *checks: Check, **kw: Any) -> ReserveCall:
    fields: dict[str, Any] = {
        "reservation_id": rid,
        "version": 3,
        "tenant_id": 7,
        "feature_id": 8,
        "options": (PoolOption("main", checks),),
        "input_tokens": 100,
        "max_output_tokens": 100,
        "min_output_tokens": 10,
        "cost_fixed": 15_000,
        "cost_per_output": 600.0,
        "prices": (150.0, 15.0, 600.0),
        "ttl_ms": 60_000,
        "meta": {"tenant": "acme", "feature": "chat", "model": "m", "score": 1.5, "on": True},
    }
    fields.update(kw)
    return ReserveCall(**fields)


def lease(client: redis.Redis, engine: Engine, rid: str) -> dict[str, Any]:
    raw = client.get(engine.keys.lease(rid))
    assert raw is not None
    data: dict[str, Any] = json.loads(raw)
    return data


def events(client: redis.Redis, engine: Engine) -> list[dict[str, str]]:
    return [
        {name.decode(): value.decode() for name, value in fields.items()}
        for _, fields in client.xrange(engine.keys.events)
    ]


def test_each_decision_is_one_round_trip(engine: Engine, client: Counting) -> None:
    checks = (bucket(engine, 1, 10_000), budget(engine, 2, 10**9), slots(engine, 3, 5))
    for name in ("reserve", "extend", "commit", "release"):
        # loaded first: a script new to this Redis costs one EVALSHA refused with NOSCRIPT
        client.script_load(script_source(name))
    client.sent.clear()
    engine.reserve(call("rsv_a", *checks))
    engine.reserve(call("rsv_b", *checks))
    engine.extend(reservation_id="rsv_a", owner=OWNER, ttl_ms=90_000, version=3)
    engine.commit(reservation_id="rsv_a", owner=OWNER, usage=Usage(100, 5), version=3)
    engine.release(reservation_id="rsv_b", owner=OWNER, version=3)

    assert client.sent == ["EVALSHA"] * 5


def test_a_grant_stores_the_lease_the_readers_expect(engine: Engine, client: Counting) -> None:
    guarantee = Check(4, "g", "tokens", 50, key=engine.keys.guarantee(4))
    checks = (bucket(engine, 1, 10_000), budget(engine, 2, 10**9), slots(engine, 3, 5), guarantee)

    granted = engine.reserve(call("rsv_a", *checks, idempotency_key="k", idempotency_hash="h"))

    assert isinstance(granted, Granted) and granted.output_tokens == 100
    stored = lease(client, engine, "rsv_a")
    assert stored["id"] == "rsv_a" and stored["st"] == "held" and stored["pool"] == "main"
    assert (stored["tenant"], stored["feature"], stored["ttl_ms"]) == (7, 8, 60_000)
    assert stored["prices"] == {"i": 150, "c": 15, "o": 600}
    assert stored["meta"] == {
        "tenant": "acme",
        "feature": "chat",
        "model": "m",
        "score": 1.5,
        "on": True,
        "pool": "main",
    }
    assert (stored["created"], stored["e"]) == (NOW, NOW + 60_000)
    assert stored["r"] == {"in_": 100, "out": 100, "cost": 75_000}
    assert stored["soft"] == {}  # cjson writes an empty list as an object
    assert stored["ck"] == [
        {"k": engine.keys.bucket(1), "kind": "b", "m": "tokens", "cap": 10_000, "amt": 200},
        {"k": checks[1].periods[0].key, "kind": "p", "m": "cost_usd", "cap": 10**9, "amt": 75_000},
        {"k": engine.keys.concurrency(3), "kind": "c", "m": "requests", "cap": 5, "amt": 1},
        {
            "k": engine.keys.guarantee(4),
            "kind": "g",
            "m": "tokens",
            "cap": 50,
            "amt": 200,
            "took": 50,
        },
    ]
    assert stored["limits"] == [
        {"id": 1, "cap": 10_000, "remaining": 9_800, "reset_ms": NOW + 1_200},
        {"id": 2, "cap": 10**9, "remaining": 10**9 - 75_000, "reset_ms": NOW + HOUR},
        {"id": 3, "cap": 5, "remaining": 4},
    ]


def test_a_grant_and_a_refusal_tell_the_ledger(engine: Engine, client: Counting) -> None:
    soft = bucket(engine, 5, 150, enforcement="soft")
    engine.reserve(call("rsv_a", bucket(engine, 1, 10_000), soft))
    refused = engine.reserve(call("rsv_b", bucket(engine, 1, 10_000), bucket(engine, 6, 5)))

    assert isinstance(refused, Refused) and refused.limit_id == 6
    reserved, refusal = events(client, engine)
    assert reserved == {
        "type": "reserved",
        "rid": "rsv_a",
        "at_ms": str(NOW),
        "created_ms": str(NOW),
        "reserved_input_tokens": "100",
        "reserved_output_tokens": "100",
        "reserved_cost_nusd": "75000",
        "granted_output_tokens": "100",
        "expires_ms": str(NOW + 60_000),
        "pool": "main",
        "would_refuse": "5",
        "tenant": "acme",
        "feature": "chat",
        "model": "m",
        "score": "1.5",
        "on": "true",
    }
    assert refusal == {
        "type": "refused",
        "rid": "rsv_b",
        "at_ms": str(NOW),
        "reason": "rate_limited",
        "limit": "6",
        "reserved_input_tokens": "100",
        "reserved_output_tokens": "100",
        "tenant": "acme",
        "feature": "chat",
        "model": "m",
        "score": "1.5",
        "on": "true",
    }


def test_a_bucket_is_one_string_that_goes_once_full(engine: Engine, client: Counting) -> None:
    check = bucket(engine, 1, 600)
    engine.reserve(call("rsv_a", check))

    assert client.get(check.key) == f"400:{NOW}".encode()
    assert 0 < client.pttl(check.key) <= 20_000 + 300_000  # refilled in 20 s, and a margin

    engine.release(reservation_id="rsv_a", owner=OWNER, version=3)
    assert client.exists(check.key) == 0  # full again: no key


def test_a_budget_counter_lasts_two_days_past_its_period(engine: Engine, client: Counting) -> None:
    check = budget(engine, 2, 10**9)
    engine.reserve(call("rsv_a", check))
    engine.reserve(call("rsv_b", check))

    key = check.periods[0].key
    assert client.get(key) == b"150000"
    assert client.pexpiretime(key) == NOW + HOUR + 2 * 86_400_000


def test_numbers_past_a_double_s_integers_are_taken(engine: Engine) -> None:
    result = engine.reserve(call("rsv_a", budget(engine, 2, 10**20)))

    assert isinstance(result, Granted)
    assert result.limits[0].cap == 10**20


def test_an_expired_lease_s_slot_is_freed_when_a_reserve_needs_it(
    engine: Engine, client: Counting
) -> None:
    check = slots(engine, 3, 1)
    assert isinstance(engine.reserve(call("rsv_a", check)), Granted)
    assert isinstance(engine.reserve(call("rsv_b", check)), Refused)
    engine.frozen_ms = NOW + 60_000  # rsv_a's time is up; no reaper has run

    assert isinstance(engine.reserve(call("rsv_c", check)), Granted)
    assert lease(client, engine, "rsv_a")["st"] == "expired"
    assert [e["type"] for e in events(client, engine)][-2:] == ["expired", "reserved"]


def test_a_reserve_with_slots_to_spare_leaves_due_leases_to_the_reaper(engine: Engine) -> None:
    engine.reserve(call("rsv_a", slots(engine, 3, 5)))
    engine.frozen_ms = NOW + 60_000

    assert isinstance(engine.reserve(call("rsv_b", slots(engine, 3, 5))), Granted)
    assert engine.reap() == 1


def test_a_replay_answers_as_the_first_call_and_another_body_conflicts(engine: Engine) -> None:
    first = engine.reserve(
        call("rsv_a", bucket(engine, 1, 10_000), idempotency_key="k", idempotency_hash="h")
    )
    engine.frozen_ms = NOW + 1_000
    again = engine.reserve(
        call("rsv_b", bucket(engine, 1, 10_000), idempotency_key="k", idempotency_hash="h")
    )
    other = engine.reserve(
        call("rsv_c", bucket(engine, 1, 10_000), idempotency_key="k", idempotency_hash="x")
    )

    assert isinstance(again, Existing) and again.granted == first
    assert again.lease.now_ms == NOW + 1_000
    assert other == Conflict(state="idempotency")


def test_a_stale_plan_changes_nothing(engine: Engine, client: Counting) -> None:
    check = bucket(engine, 1, 10_000)
    assert engine.reserve(call("rsv_a", check, version=2)) == Stale()

    assert client.exists(check.key, engine.keys.lease("rsv_a"), engine.keys.events) == 0


def test_a_commit_refunds_at_once_and_repeats_its_answer(engine: Engine, client: Counting) -> None:
    check = bucket(engine, 1, 600)
    engine.reserve(call("rsv_a", check))
    usage = Usage(100, 20, body_hash="b")

    done = engine.commit(reservation_id="rsv_a", owner=OWNER, usage=usage, version=3)
    again = engine.commit(reservation_id="rsv_a", owner=OWNER, usage=usage, version=3)

    assert isinstance(done, Settled) and done == again
    assert done.result["refunded"] == {"input_tokens": 0, "output_tokens": 80, "cost_nusd": 48_000}
    assert client.get(check.key) == f"480:{NOW}".encode()
    stored = lease(client, engine, "rsv_a")
    assert (stored["st"], stored["done"], stored["hash"]) == ("committed", NOW, "b")
    assert stored["u"] == [100, 0, 20, 27_000]
    assert 0 < client.pttl(engine.keys.lease("rsv_a")) <= HOUR  # kept the retention from now
    committed = events(client, engine)[-1]
    assert (committed["type"], committed["output_tokens"], committed["cost_nusd"]) == (
        "committed",
        "20",
        "27000",
    )


def test_an_extension_moves_the_expiry_and_says_so(engine: Engine, client: Counting) -> None:
    engine.reserve(call("rsv_a", bucket(engine, 1, 10_000)))

    view = engine.extend(reservation_id="rsv_a", owner=OWNER, ttl_ms=90_000, version=3)

    assert isinstance(view, LeaseView) and view.data["e"] == NOW + 90_000
    assert client.zscore(engine.keys.leases, "rsv_a") == NOW + 90_000
    extended = events(client, engine)[-1]
    assert (extended["type"], extended["expires_ms"]) == ("extended", str(NOW + 90_000))


def test_a_settled_lease_keeps_a_compact_record_that_answers_as_the_lease_did(
    engine: Engine, client: Counting
) -> None:
    checks = (bucket(engine, 1, 10_000), budget(engine, 2, 10**9), slots(engine, 3, 5))
    meta = {"feature": "chat", "model": "m", "tenant": "acme", "key": "k1", "metadata": "{}"}
    engine.reserve(call("rsv_a", *checks, meta=meta))
    held = client.get(engine.keys.lease("rsv_a"))
    usage = Usage(100, 5, body_hash="0123456789abcdef" * 4)
    done = engine.commit(reservation_id="rsv_a", owner=OWNER, usage=usage, version=3)

    stored = client.get(engine.keys.lease("rsv_a"))
    assert held is not None and stored is not None and len(stored) < len(held)
    record = json.loads(stored)
    assert not {"ck", "prices", "res", "ttl_ms"} & record.keys()
    assert record["meta"] == {"feature": "chat", "model": "m", "metadata": "{}"}
    assert record["hash"] == "0123456789abcdef"
    view = engine.peek(reservation_id="rsv_a", owner=OWNER, version=3)
    assert isinstance(view, LeaseView) and isinstance(done, Settled)
    assert (view.state, view.data["res"], view.data["pool"]) == ("committed", done.result, "main")
    assert engine.peek(reservation_id="rsv_a", owner=Owner(8), version=3) == Missing()
    assert engine.release(reservation_id="rsv_a", owner=OWNER, version=3) == Conflict("committed")
    assert engine.commit(reservation_id="rsv_a", owner=OWNER, usage=usage, version=3) == done
    other = Usage(100, 5, body_hash="0123456789abcdef" + "0" * 48)
    assert engine.commit(reservation_id="rsv_a", owner=OWNER, usage=other, version=3) == done
    other = Usage(100, 5, body_hash="1" * 64)
    assert engine.commit(reservation_id="rsv_a", owner=OWNER, usage=other, version=3) == Conflict(
        "committed"
    )


def test_the_key_that_made_a_reservation_settles_it_by_its_digest_alone(
    engine: Engine, client: Counting
) -> None:
    check = bucket(engine, 1, 600)
    engine.reserve(call("rsv_a", check, key_digest="d1" * 8))
    holder, other = KeyHolder("d1" * 8), KeyHolder("d2" * 8)
    usage = Usage(100, 20, body_hash="b")

    assert engine.peek(reservation_id="rsv_a", owner=other, version=None) == Missing()
    assert engine.commit(reservation_id="rsv_a", owner=other, usage=usage, version=None) == (
        Missing()
    )
    view = engine.extend(reservation_id="rsv_a", owner=holder, ttl_ms=90_000, version=None)
    done = engine.commit(reservation_id="rsv_a", owner=holder, usage=usage, version=None)

    assert isinstance(view, LeaseView) and view.data["e"] == NOW + 90_000
    # priced from the lease and refunded to the limit it recorded, as with the plan
    assert isinstance(done, Settled) and done.result["cost_nusd"] == 27_000
    assert client.get(check.key) == f"480:{NOW}".encode()
    assert lease(client, engine, "rsv_a")["kd"] == "d1" * 8  # the record keeps it
    read = engine.peek(reservation_id="rsv_a", owner=holder, version=None)
    assert isinstance(read, LeaseView) and read.data["res"] == done.result
    assert engine.commit(reservation_id="rsv_a", owner=holder, usage=usage, version=None) == done
    assert engine.peek(reservation_id="rsv_a", owner=other, version=None) == Missing()
    assert [e["type"] for e in events(client, engine)] == ["reserved", "extended", "committed"]
    assert all("kd" not in e for e in events(client, engine))  # the digest stays in Redis


def test_a_lease_without_a_key_digest_is_settled_only_with_the_plan(engine: Engine) -> None:
    engine.reserve(call("rsv_a", bucket(engine, 1, 600)))  # as leases were before digests
    usage = Usage(100, 20, body_hash="b")

    assert "kd" not in lease(engine.client, engine, "rsv_a")
    assert engine.release(reservation_id="rsv_a", owner=KeyHolder(""), version=None) == Missing()
    assert (
        engine.commit(reservation_id="rsv_a", owner=KeyHolder("d1" * 8), usage=usage, version=None)
        == Missing()
    )
    assert isinstance(
        engine.commit(reservation_id="rsv_a", owner=OWNER, usage=usage, version=3), Settled
    )


def test_a_release_replays_from_the_record(engine: Engine) -> None:
    engine.reserve(call("rsv_a", bucket(engine, 1, 10_000)))
    first = engine.release(reservation_id="rsv_a", owner=OWNER, version=3)
    engine.frozen_ms = NOW + 5_000

    assert engine.release(reservation_id="rsv_a", owner=OWNER, version=3) == first
    usage = Usage(1, 1, body_hash="b")
    again = engine.commit(reservation_id="rsv_a", owner=OWNER, usage=usage, version=3)
    assert again == Conflict("released")


def test_a_late_commit_s_record_says_so_on_replay(engine: Engine) -> None:
    engine.reserve(call("rsv_a", budget(engine, 2, 10**9)))
    engine.frozen_ms = NOW + 60_000
    assert engine.reap() == 1
    usage = Usage(10, 2, body_hash="b")

    late = engine.commit(reservation_id="rsv_a", owner=OWNER, usage=usage, version=3)
    again = engine.commit(reservation_id="rsv_a", owner=OWNER, usage=usage, version=3)

    assert isinstance(late, Settled) and late.result["lease_expired"] is True
    assert again == late


def test_an_idempotent_replay_after_settlement_answers_the_first_answer(engine: Engine) -> None:
    first = engine.reserve(
        call("rsv_a", bucket(engine, 1, 10_000), idempotency_key="k", idempotency_hash="h")
    )
    engine.commit(reservation_id="rsv_a", owner=OWNER, usage=Usage(100, 5), version=3)
    engine.frozen_ms = NOW + 1_000

    again = engine.reserve(
        call("rsv_b", bucket(engine, 1, 10_000), idempotency_key="k", idempotency_hash="h")
    )

    assert isinstance(again, Existing) and again.granted == first
    assert again.lease.state == "committed"


def old_format_lease(engine: Engine, rid: str) -> dict[str, Any]:
    """A held lease as reserve.lua wrote it while buckets were hashes under b: and g:."""
    return {
        "st": "held",
        "pool": "main",
        "created": NOW,
        "e": NOW + 60_000,
        "r": {"in_": 100, "out": 100, "cost": 75_000},
        "ck": [
            {"kind": "b", "m": "tokens", "cap": 1000, "k": engine.keys.prefix + "b:1", "amt": 200},
            {
                "kind": "g",
                "m": "tokens",
                "cap": 1000,
                "k": engine.keys.prefix + "g:4",
                "amt": 200,
                "took": 200,
            },
        ],
        "soft": [],
        "id": rid,
        "tenant": 7,
        "feature": 8,
        "ttl_ms": 60_000,
        "prices": {"i": 150.0, "c": 15.0, "o": 600.0},
        "meta": {"tenant": "acme", "feature": "chat", "model": "m", "pool": "main"},
    }


@pytest.mark.parametrize("outcome", ["committed", "released"])
def test_a_lease_from_before_the_bucket_rename_settles_into_the_current_buckets(
    engine: Engine, client: Counting, outcome: str
) -> None:
    for old in ("b:1", "g:4"):  # the old hash buckets, still alive
        client.hset(engine.keys.prefix + old, mapping={"v": 300, "t": NOW})
    client.set(engine.keys.bucket(1), f"400:{NOW}")
    client.set(engine.keys.guarantee(4), f"300:{NOW}")
    client.set(engine.keys.lease("rsv_old"), json.dumps(old_format_lease(engine, "rsv_old")))
    client.zadd(engine.keys.leases, {"rsv_old": NOW + 60_000})

    if outcome == "committed":
        usage = Usage(100, 20, body_hash="b")
        done = engine.commit(reservation_id="rsv_old", owner=OWNER, usage=usage, version=3)
    else:
        done = engine.release(reservation_id="rsv_old", owner=OWNER, version=3)

    assert isinstance(done, Settled) and done.result["status"] == outcome
    used = 120 if outcome == "committed" else 0  # the refund: what was debited less the use
    assert client.get(engine.keys.bucket(1)) == f"{400 + 200 - used}:{NOW}".encode()
    assert client.get(engine.keys.guarantee(4)) == f"{300 + 200 - used}:{NOW}".encode()
    assert client.hgetall(engine.keys.prefix + "b:1") == {b"v": b"300", b"t": str(NOW).encode()}
    assert lease(client, engine, "rsv_old")["st"] == outcome


def test_an_extension_keeps_the_idempotency_key_as_long_as_the_lease(
    engine: Engine, client: Counting
) -> None:
    check = bucket(engine, 1, 10_000)
    first = engine.reserve(call("rsv_a", check, idempotency_key="k", idempotency_hash="h"))
    idem = engine.keys.idempotency(7, "k")
    assert 0 < client.pttl(idem) <= 60_000 + HOUR

    engine.extend(reservation_id="rsv_a", owner=OWNER, ttl_ms=3 * HOUR, version=3)

    assert 3 * HOUR < client.pttl(idem) <= 4 * HOUR
    assert 3 * HOUR < client.pttl(engine.keys.lease("rsv_a")) <= 4 * HOUR
    engine.frozen_ms = NOW + 2 * HOUR
    again = engine.reserve(call("rsv_b", check, idempotency_key="k", idempotency_hash="h"))
    assert isinstance(first, Granted) and isinstance(again, Existing)
    assert again.granted.reservation_id == first.reservation_id


def test_a_burst_sets_the_buckets_depth_and_the_amount_its_refill(
    engine: Engine, client: Counting
) -> None:
    # 60,000 tokens a minute, at most 1,000 at once: a provider that quantizes per second
    shallow = bucket(engine, 1, 1_000, rate=60_000)
    first = engine.reserve(call("rsv_a", shallow, min_output_tokens=100))
    assert isinstance(first, Granted)
    (state,) = first.limits
    assert (state.cap, state.remaining) == (60_000, 800)  # the amount is shown, the depth held
    assert state.reset_ms == NOW + 200  # 200 tokens at 1,000 a second

    refused = engine.reserve(call("rsv_b", shallow, input_tokens=900, min_output_tokens=100))
    assert isinstance(refused, Refused) and refused.retry_after_ms == 200

    engine.frozen_ms = NOW + 10_000  # ten seconds refill 10,000: the depth caps it at 1,000
    again = engine.reserve(call("rsv_c", shallow, input_tokens=900, min_output_tokens=100))
    assert isinstance(again, Granted) and again.limits[0].remaining == 0
    # the commit's refund fills the bucket up to its depth, not past it
    engine.commit(reservation_id="rsv_c", owner=OWNER, usage=Usage(100, 0), version=3)
    after = engine.reserve(call("rsv_d", shallow, input_tokens=800, min_output_tokens=100))
    assert isinstance(after, Granted) and after.limits[0].remaining == 0
