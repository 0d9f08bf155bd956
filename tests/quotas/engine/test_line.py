"""Scheduled admission (quotas/lua/line.lua) against the real Redis: who waits, in what
order, for how long, and that the promises never over-admit a bucket.

The engine's clock is frozen and moved by hand (`Engine.frozen_ms`), so a minute of refill
takes no time; the processes test uses the real clock, shifted far ahead in every process.
"""

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
    Conflict,
    Existing,
    Granted,
    PoolOption,
    Refused,
    Settled,
    Unavailable,
    Usage,
)
from tests.fixtures import store_client
from tests.quotas.engine.test_core import HOUR, NOW, OWNER, budget, call, lease, slots
from tests.quotas.engine.test_pressure import pressure

CAP = 60_000  # tokens per minute: 1 token per ms


@pytest.fixture
def engine(redis_db: redis.Redis) -> Engine:
    engine = Engine(store_client(), hash_tag="line", retention_ms=HOUR)
    engine.frozen_ms = NOW
    engine.client.set(engine.keys.version, 3)
    return engine


def bucket(engine: Engine, limit_id: int = 1, cap: int = CAP, **kw: Any) -> Check:
    kw.setdefault("line", cap)
    return Check(limit_id, "b", "tokens", cap, key=engine.keys.bucket(limit_id), **kw)


def ask(engine: Engine, rid: str, tokens: int, *checks: Check, wait: int = 60_000) -> Any:
    """A reserve of `tokens` (all input, one output token) that may wait `wait` ms."""
    return engine.reserve(
        call(
            rid,
            *(checks or (bucket(engine),)),
            input_tokens=tokens - 1,
            max_output_tokens=1,
            min_output_tokens=1,
            max_wait_ms=wait,
        )
    )


def drain(engine: Engine, *checks: Check) -> None:
    """Empty the bucket (it starts full) with one immediate grant."""
    granted = ask(engine, "rsv_drain", CAP, *checks, wait=0)
    assert isinstance(granted, Granted) and granted.start_ms is None


def test_a_caller_short_only_of_a_minute_bucket_is_scheduled_with_its_lease_from_the_start(
    engine: Engine,
) -> None:
    drain(engine)
    granted = ask(engine, "rsv_a", 1_000)
    assert isinstance(granted, Granted)
    assert granted.start_ms == NOW + 1_000  # the refill of 1,000 tokens
    assert granted.expires_ms == NOW + 1_000 + 60_000
    stored = lease(engine.client, engine, "rsv_a")
    assert stored["sa"] == NOW + 1_000 and stored["st"] == "held"
    event = engine.client.xrange(engine.keys.events)[-1][1]
    assert event[b"start_ms"] == str(NOW + 1_000).encode() and event[b"wait_ms"] == b"1000"


def test_without_max_wait_the_answer_is_todays_refusal_counting_the_line(engine: Engine) -> None:
    drain(engine)
    assert isinstance(ask(engine, "rsv_a", 1_000), Granted)
    refused = ask(engine, "rsv_b", 500, wait=0)
    assert isinstance(refused, Refused)
    assert refused.retry_after_ms == 1_500  # the line ahead of it, then its own 500


def test_the_line_is_first_come_first_served_by_capacity(engine: Engine) -> None:
    drain(engine)
    sizes = [500, 40_000, 500, 500, 2_000, 500]
    starts = []
    for i, size in enumerate(sizes):
        granted = ask(engine, f"rsv_{i}", size)
        assert isinstance(granted, Granted)
        starts.append(granted.start_ms)
    # each starts when the refill has paid for everyone before it and itself
    total = 0
    for size, start in zip(sizes, starts, strict=True):
        total += size
        assert start == NOW + total


def test_a_large_request_is_not_starved_by_a_flood_of_small_ones(engine: Engine) -> None:
    """A 40,000-token request joins a bucket that a flood of 500-token callers keeps dry; it
    starts when it was promised, and every small caller that came later starts after it."""
    drain(engine)
    now = NOW
    big = None
    small_after: list[int] = []
    for i in range(400):  # 500 tokens every 100 ms: a bit above the refill of 1 per ms
        engine.frozen_ms = now = now + 100
        if i == 50:
            big = ask(engine, "rsv_big", 40_000)
            assert isinstance(big, Granted) and big.start_ms is not None
            promised_at = now
        granted = ask(engine, f"rsv_{i}", 500)
        if isinstance(granted, Granted) and big is not None:
            assert granted.start_ms is not None
            small_after.append(granted.start_ms)
    assert big is not None and big.start_ms is not None
    assert big.start_ms - promised_at <= 60_000
    assert small_after and min(small_after) > big.start_ms
    # at its start, and not before, the call may go and be committed
    engine.frozen_ms = big.start_ms - 1
    early = engine.commit(reservation_id="rsv_big", owner=OWNER, usage=Usage(39_999, 1), version=3)
    assert early == Conflict(state="scheduled", wait_ms=1)
    engine.frozen_ms = big.start_ms
    done = engine.commit(reservation_id="rsv_big", owner=OWNER, usage=Usage(39_999, 1), version=3)
    assert isinstance(done, Settled)


def test_the_line_is_bounded_and_refuses_at_once_past_it(engine: Engine) -> None:
    check = bucket(engine, line=5_000)
    drain(engine, check)
    assert isinstance(ask(engine, "rsv_a", 4_000, check), Granted)
    refused = ask(engine, "rsv_b", 2_000, check)
    assert isinstance(refused, Refused) and refused.reason == "rate_limited"
    assert refused.retry_after_ms == 6_000
    assert isinstance(ask(engine, "rsv_c", 1_000, check), Granted)  # still fits the line


def test_a_wait_longer_than_max_wait_is_refused(engine: Engine) -> None:
    drain(engine)
    assert isinstance(ask(engine, "rsv_a", 10_000), Granted)
    assert isinstance(ask(engine, "rsv_b", 1_000, wait=10_999), Refused)
    granted = ask(engine, "rsv_c", 1_000, wait=11_000)
    assert isinstance(granted, Granted) and granted.start_ms == NOW + 11_000


def test_a_bucket_without_a_line_is_never_scheduled(engine: Engine) -> None:
    check = bucket(engine, line=0)
    drain(engine, check)
    assert isinstance(ask(engine, "rsv_a", 1_000, check), Refused)


@pytest.mark.parametrize("short", ["budget", "concurrency"])
def test_budgets_and_concurrency_are_never_scheduled(engine: Engine, short: str) -> None:
    limit = budget(engine, 2, 20_000) if short == "budget" else slots(engine, 3, 1)
    drain(engine, bucket(engine), limit)
    refused = ask(engine, "rsv_a", 1_000, bucket(engine), limit, wait=300_000)
    assert isinstance(refused, Refused)
    assert refused.reason == ("budget_exhausted" if short == "budget" else "concurrency")
    assert engine.client.get(engine.keys.lease("rsv_a")) is None


def test_a_protected_class_is_not_made_to_wait_by_lower_classes_in_line(engine: Engine) -> None:
    """interactive keeps 30% of the pool: batch's floor is 18,000 tokens."""
    interactive, batch = bucket(engine), bucket(engine, floor=18_000)
    ask(engine, "rsv_fill", 42_000, batch, wait=0)  # batch takes all it may
    line = [ask(engine, f"rsv_b{i}", 5_000, batch) for i in range(6)]
    assert all(isinstance(g, Granted) and g.start_ms for g in line)
    # the protected 18,000 are still there, at once, for interactive
    for i in range(3):
        granted = ask(engine, f"rsv_i{i}", 6_000, interactive, wait=0)
        assert isinstance(granted, Granted) and granted.start_ms is None
    # beyond its headroom interactive lines up, and batch never overtakes it
    late_interactive = ask(engine, "rsv_i3", 1_000, interactive)
    late_batch = ask(engine, "rsv_b6", 1_000, batch)
    assert isinstance(late_interactive, Granted) and isinstance(late_batch, Granted)
    assert late_batch.start_ms > late_interactive.start_ms > line[-1].start_ms


def test_releasing_early_moves_later_callers_forward(engine: Engine) -> None:
    drain(engine)
    first = ask(engine, "rsv_a", 10_000)
    second = ask(engine, "rsv_b", 10_000)
    assert isinstance(first, Granted) and isinstance(second, Granted)
    assert second.start_ms == NOW + 20_000
    released = engine.release(reservation_id="rsv_a", owner=OWNER, version=3)
    assert isinstance(released, Settled)
    # a promise given cannot move, but the line is shorter for whoever comes next
    third = ask(engine, "rsv_c", 10_000)
    assert isinstance(third, Granted) and third.start_ms == NOW + 20_000


def test_an_extension_of_a_scheduled_lease_runs_from_its_start(engine: Engine) -> None:
    drain(engine)
    ask(engine, "rsv_a", 5_000)
    view = engine.extend(reservation_id="rsv_a", owner=OWNER, ttl_ms=1_000, version=3)
    assert view.data["e"] == NOW + 5_000 + 1_000  # type: ignore[union-attr]


def test_a_scheduled_reservation_never_used_expires_from_its_start(engine: Engine) -> None:
    drain(engine)
    ask(engine, "rsv_a", 5_000)  # starts at +5 s, a lease of 60 s
    engine.frozen_ms = NOW + 60_000
    assert engine.reap() == 1  # the drain's lease only
    assert lease(engine.client, engine, "rsv_a")["st"] == "held"
    engine.frozen_ms = NOW + 65_000
    assert engine.reap() == 1
    assert lease(engine.client, engine, "rsv_a")["st"] == "expired"


def test_a_replay_of_a_scheduled_reservation_answers_its_first_answer(engine: Engine) -> None:
    drain(engine)
    first = engine.reserve(
        call(
            "rsv_a",
            bucket(engine),
            input_tokens=2_999,
            max_output_tokens=1,
            min_output_tokens=1,
            max_wait_ms=10_000,
            idempotency_key="k",
            idempotency_hash="h",
        )
    )
    engine.frozen_ms = NOW + 1_000
    again = engine.reserve(
        call(
            "rsv_b",
            bucket(engine),
            input_tokens=2_999,
            max_output_tokens=1,
            min_output_tokens=1,
            max_wait_ms=10_000,
            idempotency_key="k",
            idempotency_hash="h",
        )
    )
    assert isinstance(first, Granted) and first.start_ms == NOW + 3_000
    assert isinstance(again, Existing) and again.granted == first
    assert engine.client.get(engine.keys.lease("rsv_b")) is None  # nothing taken twice


# -- several processes promising against one bucket ----------------------------------------

PROCESSES = 8
ASKS = 60
SHIFT_MS = 10 * 86_400_000  # every process's clock, moved alike: a bucket of its own era


# -- with burst, the adaptive share and the breaker (pressure.lua) ----------------------------


def pool(engine: Engine, name: str, pool_id: int) -> PoolOption:
    """A pool whose own minute bucket (limit pool_id * 10) has a line, adaptive, with a
    breaker after 20 calls."""
    limit_id = pool_id * 10
    check = bucket(engine, limit_id, pool_limit=True)
    return PoolOption(name, (check,), pressure(engine, pool_id))


def ask_pools(engine: Engine, rid: str, tokens: int, *options: PoolOption, wait: int) -> Any:
    return engine.reserve(
        call(
            rid,
            options=options,
            input_tokens=tokens - 1,
            max_output_tokens=1,
            min_output_tokens=1,
            max_wait_ms=wait,
        )
    )


def test_a_burst_bucket_repays_its_line_at_its_amount_and_never_lines_up_past_its_depth(
    engine: Engine,
) -> None:
    """Depth 6,000, refill 60,000 a minute: the line is repaid at 1 token per ms."""
    check = bucket(engine, cap=6_000, rate=CAP, line=CAP)
    assert isinstance(ask(engine, "rsv_drain", 6_000, check, wait=0), Granted)
    first = ask(engine, "rsv_a", 3_000, check)
    second = ask(engine, "rsv_b", 5_000, check)
    assert isinstance(first, Granted) and first.start_ms == NOW + 3_000
    assert isinstance(second, Granted) and second.start_ms == NOW + 8_000
    # larger than the depth: it never fits at once, so it is never promised a start either
    too_big = ask(engine, "rsv_c", 6_001, check, wait=300_000)
    assert isinstance(too_big, Refused) and too_big.retry_after_ms is None
    # once the line is repaid the level refills, never above the depth
    engine.frozen_ms = NOW + 8_000 + 60_000
    assert isinstance(ask(engine, "rsv_d", 6_000, check, wait=0), Granted)
    assert isinstance(ask(engine, "rsv_e", 1, check, wait=0), Refused)


def test_a_drop_of_the_share_pushes_new_starts_later_and_keeps_those_given(
    engine: Engine,
) -> None:
    east = pool(engine, "east", 1)
    assert isinstance(ask_pools(engine, "rsv_drain", CAP, east, wait=0), Granted)
    before = ask_pools(engine, "rsv_a", 6_000, east, wait=60_000)
    assert isinstance(before, Granted) and before.start_ms == NOW + 6_000
    # the provider's 429s brought the share to a half (test_pressure shows how it moves)
    engine.client.hset(engine.keys.pressure(1), "s", 0.5)
    after = ask_pools(engine, "rsv_b", 6_000, east, wait=60_000)
    # the line (12,000) is repaid at 30,000 a minute now, not 60,000
    assert isinstance(after, Granted) and after.start_ms == NOW + 24_000
    (limit,) = after.limits
    assert (limit.cap, limit.configured) == (30_000, CAP)
    # the promise given before the drop keeps its start
    assert lease(engine.client, engine, "rsv_a")["sa"] == NOW + 6_000
    # the line holds a minute of the effective capacity: 30,000, of which 12,000 are taken
    past_bound = ask_pools(engine, "rsv_c", 20_000, east, wait=300_000)
    assert isinstance(past_bound, Refused)
    assert isinstance(ask_pools(engine, "rsv_d", 18_000, east, wait=300_000), Granted)


def test_an_open_pool_is_skipped_before_any_promise(engine: Engine) -> None:
    east, west = pool(engine, "east", 1), pool(engine, "west", 2)
    for option in (east, west):
        drained = ask_pools(engine, f"rsv_drain_{option.pool}", CAP, option, wait=0)
        assert isinstance(drained, Granted)
    engine.client.hset(engine.keys.pressure(1), "o", NOW + 30_000)  # east's breaker opened
    # east is first, but open: the promise is west's, and the answer says why
    moved = ask_pools(engine, "rsv_a", 1_000, east, west, wait=60_000)
    assert isinstance(moved, Granted) and moved.pool == "west" and moved.start_ms == NOW + 1_000
    assert moved.breaker == ({"pool": "east", "state": "open", "retry_ms": 30_000},)
    # with east alone: unavailable, never a place in east's line
    alone = ask_pools(engine, "rsv_b", 1_000, east, wait=60_000)
    assert alone == Unavailable(pool="east", retry_after_ms=30_000, now_ms=NOW)
    # half-open: its probe goes now or not at all, so a short bucket refuses without a wait
    engine.frozen_ms = NOW + 30_000
    half_open = ask_pools(engine, "rsv_c", 40_000, east, wait=60_000)
    assert isinstance(half_open, Refused) and half_open.reason == "rate_limited"
    assert engine.client.hget(engine.keys.pressure(1), "p") is None  # the probe is not spent
    assert engine.client.get(engine.keys.lease("rsv_c")) is None


def _promiser(index: int, go: Any, out: str) -> None:
    """A forked process with its own connection: reserves of random sizes that may wait."""
    try:
        engine = Engine(store_client(), hash_tag="line")
        engine.clock_offset_ms = SHIFT_MS
        check = bucket(engine, line=5 * CAP)
        if not go.wait(30):
            raise RuntimeError("never told to start")
        sizes = [500 + (index * 7919 + i * 104_729) % 4_000 for i in range(ASKS)]
        promises = []
        for i, size in enumerate(sizes):
            granted = ask(engine, f"rsv_{index}_{i}", size, check, wait=300_000)
            if isinstance(granted, Granted):
                start = granted.start_ms if granted.start_ms is not None else granted.now_ms
                promises.append((start, size, granted.now_ms))
        result: dict[str, Any] = {"promises": promises}
    except BaseException:
        result = {"error": traceback.format_exc()}
    Path(out).write_text(json.dumps(result))


def test_several_processes_promising_never_over_admit_the_bucket(
    engine: Engine, tmp_path: Path
) -> None:
    """The bucket starts full (CAP) and refills CAP per minute: by any instant t after the
    first decision, the calls allowed to start by t add up to at most CAP + the refill."""
    context = multiprocessing.get_context("fork")
    go = context.Event()
    outputs = [tmp_path / f"p{i}.json" for i in range(PROCESSES)]
    processes = [
        context.Process(target=_promiser, args=(i, go, str(outputs[i])), daemon=True)
        for i in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    seconds, micros = engine.client.time()
    first = seconds * 1000 + micros // 1000 + SHIFT_MS  # before any process decides
    go.set()
    for process in processes:
        process.join(60)
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    results = [json.loads(path.read_text()) for path in outputs]
    assert not [r["error"] for r in results if "error" in r]
    promises = sorted(p for r in results for p in r["promises"])
    scheduled = [p for p in promises if p[0] > p[2]]
    assert len(scheduled) >= 40, "callers should have waited in line"
    assert len(promises) < PROCESSES * ASKS, "the line's bound should have refused some"
    started = 0
    worst = -float("inf")
    for start, size, _ in promises:
        started += size
        allowed = CAP + (start - first) * CAP / 60_000
        worst = max(worst, started - allowed)
        assert started <= allowed + 1, (start - first, started, allowed)
    total = sum(size for _, size, _ in promises)
    span = promises[-1][0] - first
    print(
        f"\n{len(promises)} grants ({len(scheduled)} scheduled) of {total} tokens starting "
        f"over {span / 1000:.1f} s: {total * 60_000 / max(span, 1):.0f} tokens/min against "
        f"{CAP} + {CAP}/min; closest to the bound: {worst:.0f} tokens"
    )
