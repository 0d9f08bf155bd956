"""Following the provider (pressure.lua) against the real Redis: the adaptive share, header
sync, the breaker and failover, each decided inside the reserve, commit and release scripts.
Several processes report together where the rule is about concurrency."""

from __future__ import annotations

import json
import multiprocessing
import traceback
from pathlib import Path
from typing import Any

import pytest
import redis

from quotas.engine import Engine
from quotas.engine.types import (
    Check,
    Granted,
    Owner,
    PoolOption,
    Pressure,
    Report,
    ReserveCall,
    Settled,
    Unavailable,
    Usage,
)
from tests.fixtures import store_client
from tests.quotas.engine.test_core import NOW, OWNER, events

TAG = "pressure-test"
CAP = 60_000  # tokens per minute: 1,000 a second
SECOND = 1000


@pytest.fixture
def client(redis_db: redis.Redis) -> redis.Redis:
    return store_client()


@pytest.fixture
def engine(client: redis.Redis) -> Engine:
    engine = Engine(client, hash_tag=TAG, retention_ms=3_600_000)
    engine.frozen_ms = NOW
    client.set(engine.keys.version, 3)
    return engine


def pressure(engine: Engine, pool_id: int, **kw: Any) -> Pressure:
    settings_: dict[str, Any] = {
        "key": engine.keys.pressure(pool_id),
        "adaptive": True,
        "floor": 0.25,
        "decrease": 0.7,
        "cooldown_ms": 2000,
        "recovery_ms": 300_000,
        "window_ms": 30_000,
        "min_calls": 20,
        "failure_ratio": 0.5,
        "open_ms": 30_000,
    }
    settings_.update(kw)
    return Pressure(**settings_)


def option(engine: Engine, pool: str, pool_id: int, **kw: Any) -> PoolOption:
    limit_id = pool_id * 10
    check = Check(limit_id, "b", "tokens", CAP, key=engine.keys.bucket(limit_id), pool_limit=True)
    return PoolOption(pool, (check,), pressure(engine, pool_id, **kw))


def call(rid: str, *options: PoolOption, tokens: int = 100) -> ReserveCall:
    return ReserveCall(
        reservation_id=rid,
        version=3,
        tenant_id=7,
        feature_id=8,
        options=options,
        input_tokens=tokens,
        max_output_tokens=0,
        min_output_tokens=0,
        cost_fixed=0,
        cost_per_output=0.0,
        prices=(0.0, 0.0, 0.0),
        ttl_ms=600_000,
        meta={"tenant": "acme", "feature": "chat", "model": "m"},
    )


def share(client: redis.Redis, engine: Engine, pool_id: int) -> float:
    raw = client.hget(engine.keys.pressure(pool_id), "s")
    return 1.0 if raw is None else float(raw)


def granted(engine: Engine, rid: str, *options: PoolOption, tokens: int = 100) -> Granted:
    result = engine.reserve(call(rid, *options, tokens=tokens))
    assert isinstance(result, Granted), result
    return result


def report(engine: Engine, rid: str, status: int, **limits: dict[str, int]) -> None:
    """Settle a reservation as a caller reports it: a 2xx commits, anything else releases."""
    told = Report(status=status, limits=limits)
    if 200 <= status < 300:
        result = engine.commit(
            reservation_id=rid, owner=OWNER, usage=Usage(100, 0), version=3, report=told
        )
    else:
        result = engine.release(reservation_id=rid, owner=OWNER, version=3, report=told)
    assert isinstance(result, Settled), result


def of_type(client: redis.Redis, engine: Engine, kind: str) -> list[dict[str, str]]:
    return [e for e in events(client, engine) if e["type"] == kind]


# -- adaptive share ----------------------------------------------------------------------------


def _report_from_process(
    rid: str, status: int, go: Any, out: str, limits: dict[str, dict[str, int]]
) -> None:
    """A forked process: its own connection; reports its reservation's provider status."""
    try:
        engine = Engine(store_client(), hash_tag=TAG)
        engine.frozen_ms = NOW
        if not go.wait(30):
            raise RuntimeError("never told to start")
        report(engine, rid, status, **limits)
        Path(out).write_text("ok")
    except BaseException:
        Path(out).write_text(traceback.format_exc())


def report_together(
    rids: list[str], status: int, tmp_path: Path, limits: list[dict[str, Any]] | None = None
) -> None:
    """Each reservation reported by a process of its own, all released at one signal."""
    stated = limits or [{} for _ in rids]
    context = multiprocessing.get_context("fork")
    go = context.Event()
    outs = [tmp_path / f"{rid}.out" for rid in rids]
    processes = [
        context.Process(target=_report_from_process, args=(rid, status, go, str(out), told))
        for rid, out, told in zip(rids, outs, stated, strict=True)
    ]
    for process in processes:
        process.start()
    go.set()
    for process in processes:
        process.join(30)
    assert [out.read_text() for out in outs] == ["ok"] * len(rids)


def test_429s_from_several_processes_at_once_decrease_the_share_once(
    engine: Engine, client: redis.Redis, tmp_path: Path
) -> None:
    pool = option(engine, "main", 1)
    rids = [f"rsv_{i}" for i in range(12)]
    for rid in [*rids, "rsv_later", "rsv_after"]:
        granted(engine, rid, pool)

    report_together(rids, 429, tmp_path)

    assert share(client, engine, 1) == pytest.approx(0.7)
    adapted = of_type(client, engine, "adapted")
    assert len(adapted) == 1 and adapted[0]["cause"] == "provider_429"
    assert adapted[0]["pool"] == "main" and float(adapted[0]["share"]) == pytest.approx(0.7)
    # a second burst within the cooldown changes nothing; after it, one more decrease
    engine.frozen_ms = NOW + 1999
    report(engine, "rsv_later", 429)
    assert share(client, engine, 1) == pytest.approx(0.7)
    engine.frozen_ms = NOW + 2000
    report(engine, "rsv_after", 429)
    assert share(client, engine, 1) == pytest.approx(0.49)


def test_the_share_scales_the_pool_limits_and_the_answer_says_so(
    engine: Engine, client: redis.Redis
) -> None:
    pool = option(engine, "main", 1)
    granted(engine, "rsv_a", pool)
    report(engine, "rsv_a", 429)
    engine.frozen_ms = NOW + SECOND  # the 429 emptied the bucket: 700 tokens back

    result = granted(engine, "rsv_b", pool)

    (state,) = result.limits
    assert (state.cap, state.configured) == (42_000, CAP)  # 0.7 of 60,000
    # the bucket holds at most the effective amount: more than it is refused
    refused = engine.reserve(call("rsv_c", pool, tokens=42_000))
    assert not isinstance(refused, Granted)


def test_the_share_never_goes_under_the_floor(engine: Engine, client: redis.Redis) -> None:
    pool = option(engine, "main", 1)
    for i in range(10):
        engine.frozen_ms = NOW + i * 2000
        granted(engine, f"rsv_{i}", pool)
        report(engine, f"rsv_{i}", 429)

    assert share(client, engine, 1) == pytest.approx(0.25)
    engine.frozen_ms += SECOND
    state = granted(engine, "rsv_x", pool).limits[0]
    assert state.cap == 15_000


def test_the_share_recovers_while_calls_succeed_and_never_passes_one(
    engine: Engine, client: redis.Redis
) -> None:
    pool = option(engine, "main", 1)
    for i in range(4):  # 0.7, 0.49, 0.343, 0.25 (floor)
        engine.frozen_ms = NOW + i * 2000
        granted(engine, f"rsv_{i}", pool)
        report(engine, f"rsv_{i}", 429)
    low_at = NOW + 6000
    assert share(client, engine, 1) == pytest.approx(0.25)

    # recovery: (1 - floor) per 300 s, counted from the last decrease, while calls succeed
    engine.frozen_ms = low_at + 60_000
    granted(engine, "rsv_ok1", pool)
    report(engine, "rsv_ok1", 200)
    assert share(client, engine, 1) == pytest.approx(0.25 + 0.75 * 60 / 300)

    # a failure stops the clock: the time until the next success does not count
    engine.frozen_ms = low_at + 90_000
    granted(engine, "rsv_bad", pool)
    report(engine, "rsv_bad", 503)
    engine.frozen_ms = low_at + 100_000
    granted(engine, "rsv_ok2", pool)
    report(engine, "rsv_ok2", 200)
    assert share(client, engine, 1) == pytest.approx(0.25 + 0.75 * 70 / 300)

    # an hour later, full: never above 1
    engine.frozen_ms = low_at + 3_600_000
    granted(engine, "rsv_ok3", pool)
    report(engine, "rsv_ok3", 200)
    assert share(client, engine, 1) == 1.0
    causes = [(e["cause"], e["share"]) for e in of_type(client, engine, "adapted")]
    assert causes[-1] == ("recovery", "1.0000")
    state = granted(engine, "rsv_full", pool).limits[0]
    assert state.cap == state.configured == CAP


def test_a_pool_that_is_not_adaptive_keeps_its_capacity(
    engine: Engine, client: redis.Redis
) -> None:
    pool = option(engine, "main", 1, adaptive=False)
    granted(engine, "rsv_a", pool)
    report(engine, "rsv_a", 429)

    assert share(client, engine, 1) == 1.0
    engine.frozen_ms = NOW + SECOND
    assert granted(engine, "rsv_b", pool).limits[0].cap == CAP
    assert of_type(client, engine, "adapted") == []


# -- header sync -------------------------------------------------------------------------------


def test_the_providers_remaining_lowers_the_bucket_and_never_raises_it(
    engine: Engine, client: redis.Redis
) -> None:
    pool = option(engine, "main", 1, adaptive=False)
    granted(engine, "rsv_a", pool, tokens=1000)  # 59,000 left
    report(engine, "rsv_a", 200, tokens={"r": 5000})

    # the commit refunds the unused 900 tokens first-hand, then the provider's number holds
    assert granted(engine, "rsv_b", pool, tokens=100).limits[0].remaining == 4900

    granted(engine, "rsv_c", pool, tokens=100)  # 4,800 left
    report(engine, "rsv_c", 200, tokens={"r": 50_000})  # more than we hold: not raised
    assert granted(engine, "rsv_d", pool, tokens=100).limits[0].remaining == 4700

    report(engine, "rsv_b", 200, requests={"r": 0})  # another metric: no bucket of it here
    assert granted(engine, "rsv_e", pool, tokens=100).limits[0].remaining == 4600


def test_a_provider_429_empties_the_pool_bucket_instead_of_refunding_it(
    engine: Engine, client: redis.Redis
) -> None:
    """The provider's headers may still state the tier while it refuses: the 429 itself says
    nothing is left, so the released reservation's tokens do not admit the next call at once;
    the bucket refills at its rate (1,000 tokens a second here)."""
    pool = option(engine, "main", 1, adaptive=False)
    granted(engine, "rsv_a", pool, tokens=5000)  # 55,000 left
    report(engine, "rsv_a", 429, tokens={"r": 40_000})

    refused = engine.reserve(call("rsv_b", pool, tokens=100))
    assert not isinstance(refused, Granted)
    engine.frozen_ms = NOW + 2 * SECOND
    assert granted(engine, "rsv_c", pool, tokens=100).limits[0].remaining == 2000 - 100

    report(engine, "rsv_c", 503)  # a failure that is not the provider's "full": refunded
    assert granted(engine, "rsv_d", pool, tokens=100).limits[0].remaining == 2000 - 100


def test_remainders_reported_together_leave_the_bucket_at_the_lowest(
    engine: Engine, client: redis.Redis, tmp_path: Path
) -> None:
    pool = option(engine, "main", 1, adaptive=False)
    rids = [f"rsv_{i}" for i in range(10)]
    for rid in rids:
        granted(engine, rid, pool)  # 100 each: 59,000 left, and nothing to refund
    remainders = [30_000, 7_000, 45_000, 52_000, 9_500, 70_000, 8_000, 20_000, 65_000, 11_000]

    report_together(rids, 200, tmp_path, [{"tokens": {"r": r}} for r in remainders])

    assert granted(engine, "rsv_after", pool).limits[0].remaining == 7_000 - 100


def test_a_provider_limit_below_the_configured_one_is_an_event_once(
    engine: Engine, client: redis.Redis
) -> None:
    pool = option(engine, "main", 1)
    for i in range(3):
        granted(engine, f"rsv_{i}", pool)
        report(engine, f"rsv_{i}", 200, tokens={"l": 40_000})
    granted(engine, "rsv_above", pool)
    report(engine, "rsv_above", 200, tokens={"l": 90_000})

    (event,) = of_type(client, engine, "provider_limit")
    assert (event["metric"], event["limit"], event["configured"]) == ("tokens", "40000", "60000")


# -- breaker and failover ----------------------------------------------------------------------


def _open(engine: Engine, pool: PoolOption, failures: int = 10, successes: int = 10) -> None:
    for i in range(successes + failures):
        rid = f"rsv_w{i}"
        granted(engine, rid, pool)
        report(engine, rid, 200 if i < successes else 502 if i % 2 else 0)


def test_the_breaker_opens_fails_over_refuses_probes_and_closes(
    engine: Engine, client: redis.Redis
) -> None:
    first, second = option(engine, "east", 1), option(engine, "west", 2)

    _open(engine, first, failures=9)  # 9 of 19: not enough calls, and not half
    assert of_type(client, engine, "breaker_opened") == []
    granted(engine, "rsv_20th", first)
    report(engine, "rsv_20th", 0)  # the 20th call, the 10th failure: half of 20
    (opened,) = of_type(client, engine, "breaker_opened")
    assert (opened["pool"], opened["calls"], opened["failures"]) == ("east", "20", "10")

    # open: the next candidate takes over, and the answer says why
    moved = granted(engine, "rsv_failover", first, second)
    assert moved.pool == "west"
    assert moved.breaker == ({"pool": "east", "state": "open", "retry_ms": 30_000},)
    # with no other candidate: unavailable, for as long as it stays open
    engine.frozen_ms = NOW + 10_000
    refused = engine.reserve(call("rsv_none", first))
    assert refused == Unavailable(pool="east", retry_after_ms=20_000, now_ms=NOW + 10_000)

    # half-open after open_seconds: one probe a second goes through
    engine.frozen_ms = NOW + 30_000
    probe = granted(engine, "rsv_probe", first)
    assert probe.pool == "east"
    assert probe.breaker == ({"pool": "east", "state": "half_open", "probe": True},)
    again = engine.reserve(call("rsv_again", first))
    assert isinstance(again, Unavailable) and again.retry_after_ms == 1000
    # a failed probe opens it again
    report(engine, "rsv_probe", 503)
    assert isinstance(engine.reserve(call("rsv_reopened", first)), Unavailable)
    assert len(of_type(client, engine, "breaker_opened")) == 2

    # the next probe succeeds: closed
    engine.frozen_ms = NOW + 60_000
    granted(engine, "rsv_probe2", first)
    report(engine, "rsv_probe2", 200)
    (closed,) = of_type(client, engine, "breaker_closed")
    assert closed["pool"] == "east"
    back = granted(engine, "rsv_back", first, second)
    assert back.pool == "east" and back.breaker == ()


def test_failures_from_several_processes_at_once_open_the_breaker_once(
    engine: Engine, client: redis.Redis, tmp_path: Path
) -> None:
    pool = option(engine, "main", 1)
    rids = [f"rsv_{i}" for i in range(30)]
    for rid in rids:
        granted(engine, rid, pool)

    report_together(rids, 503, tmp_path)

    (opened,) = of_type(client, engine, "breaker_opened")
    assert (opened["calls"], opened["failures"]) == ("20", "20")  # the 20th report opened it
    assert isinstance(engine.reserve(call("rsv_next", pool)), Unavailable)
    # every report is in the settlement events, counted or not
    assert len(of_type(client, engine, "released")) == 30


def test_failures_spread_past_the_window_do_not_open_the_breaker(
    engine: Engine, client: redis.Redis
) -> None:
    pool = option(engine, "main", 1)
    for i in range(40):  # every other call fails, but only ~10 calls fall in any 30 s
        engine.frozen_ms = NOW + i * 3000
        granted(engine, f"rsv_{i}", pool)
        report(engine, f"rsv_{i}", 500 if i % 2 else 200)

    assert of_type(client, engine, "breaker_opened") == []


def test_a_pool_without_breaker_never_opens(engine: Engine, client: redis.Redis) -> None:
    pool = option(engine, "main", 1, window_ms=0)
    _open(engine, pool, failures=30, successes=0)

    assert of_type(client, engine, "breaker_opened") == []
    assert granted(engine, "rsv_still", pool).pool == "main"


def test_the_reports_are_in_the_settlement_events(engine: Engine, client: redis.Redis) -> None:
    pool = option(engine, "main", 1)
    granted(engine, "rsv_a", pool)
    engine.release(
        reservation_id="rsv_a",
        owner=Owner(7),
        version=3,
        report=Report(status=429),
        extra={"upstream_status": "429", "latency_ms": "12"},
    )

    (released,) = of_type(client, engine, "released")
    assert (released["upstream_status"], released["latency_ms"]) == ("429", "12")
    assert json.loads(client.get(engine.keys.lease("rsv_a")) or "{}")["st"] == "released"
