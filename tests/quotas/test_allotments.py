"""The rebalancer (quotas/allotments.py): shared limits' units follow demand, never add up
to more than the limit, and a pool that one tenant uses almost alone stays usable.

The engine runs on the store the tests run on (one Redis, or the cluster of the cluster
pass), with its clock frozen and moved by hand; the processes test uses the real clock."""

from __future__ import annotations

import json
import multiprocessing
import time
import traceback
from collections.abc import Callable
from dataclasses import replace as with_
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from quotas.allotments import allot_targets, allotments_restore, allotments_round
from quotas.engine import Check, Engine, Granted, Owner, PoolOption, Refused, Usage
from quotas.engine.core import KeySpace
from quotas.engine.types import Period, Pressure
from quotas.store import get_redis
from tests.quotas.engine.test_core import HOUR, NOW, call
from tests.quotas.engine.test_partitions import PARTS, ask, pool_bucket
from tests.quotas.engine.test_pressure import pressure

CAP = 60_000  # tokens a minute: 1 a millisecond


@pytest.fixture
def engine(redis_db: redis.Redis) -> Engine:
    engine = Engine(get_redis(), hash_tag="allot", partitions=PARTS, retention_ms=HOUR)
    engine.frozen_ms = NOW
    for space in engine.spaces:
        engine.client.set(space.version, 3)
    return engine


def units(engine: Engine, limit_id: int = 1) -> list[int]:
    """Each partition's units of a limit of CAP as stored, or its even split (none stored)."""
    stored = [engine.client.hget(space.allot, str(limit_id)) for space in engine.spaces]
    return [int(raw.split(b":")[0]) if raw else CAP // PARTS for raw in stored]


def rebalance(engine: Engine, make: Any = pool_bucket, **kw: Any) -> None:
    allotments_round(engine, [[make(space, CAP, **kw)] for space in engine.spaces])


@given(
    amount=st.integers(0, 10**12),
    wants=st.lists(st.floats(0, 1e13, allow_nan=False), min_size=1, max_size=16),
    data=st.data(),
)
def test_targets_add_up_to_the_amount_keep_the_floors_and_fill_the_smallest_wants_first(
    amount: int, wants: list[float], data: st.DataObject
) -> None:
    floors = data.draw(st.lists(st.integers(0, amount), min_size=len(wants), max_size=len(wants)))
    targets = allot_targets(amount, wants, floors)
    assert all(t >= f for t, f in zip(targets, floors, strict=True))
    if sum(floors) <= amount:
        assert sum(targets) == amount
        rest = amount - sum(floors)
        if sum(wants) <= rest:  # everyone gets what it asks, to the unit
            assert all(t - f >= int(w) for t, f, w in zip(targets, floors, wants, strict=True))
        else:  # max-min fair: whoever got less than it wants got no less than anyone else
            given_ = [t - f for t, f in zip(targets, floors, strict=True)]
            short = [g for g, w in zip(given_, wants, strict=True) if g + 1 < w]
            assert all(g <= s + 1 for s in short for g in given_)
    else:
        assert targets == floors


def test_a_round_moves_units_to_the_partition_that_asks(engine: Engine) -> None:
    for i in range(50):  # partition 0 asks for 5,000 tokens a time, and is mostly refused
        ask(engine, 0, f"rsv_{i}", 5_000, pool_bucket(engine.spaces[0], CAP))
    engine.frozen_ms = NOW + 1_000
    moved_before = REGISTRY.get_sample_value("quota_allotment_moved_units_total") or 0
    started = time.time()
    rebalance(engine)
    after = units(engine)
    assert sum(after) == CAP
    assert after[0] > 0.95 * CAP, after
    # the metrics say where the units are, and how many moved
    shown = [
        REGISTRY.get_sample_value("quota_allotment_units", {"limit": "1", "partition": str(i)})
        for i in range(PARTS)
    ]
    assert shown == after
    moved = REGISTRY.get_sample_value("quota_allotment_moved_units_total") - moved_before
    assert moved == after[0] - CAP // PARTS
    last_round = REGISTRY.get_sample_value("quota_allotment_last_round_timestamp_seconds")
    assert started <= last_round <= time.time()
    # and back: once partition 2 asks and 0 has gone quiet, a few rounds even it out
    for round_ in range(1, 6):
        for i in range(20):
            ask(engine, 2, f"rsv_{round_}_{i}", 1_000, pool_bucket(engine.spaces[2], CAP))
        engine.frozen_ms = NOW + 1_000 * (round_ + 1)
        rebalance(engine)
        assert sum(units(engine)) == CAP
    assert units(engine)[2] > 0.5 * CAP, units(engine)


def test_a_budget_never_gives_away_what_a_partition_has_used(engine: Engine) -> None:
    start = NOW - NOW % HOUR
    middle = start + HOUR // 2  # the rounds' seconds stay in one period of the budget
    engine.frozen_ms = middle

    def budget(space: KeySpace, cap: int, limit_id: int = 5) -> Check:
        periods = tuple(
            Period(space.period(limit_id, s), s, s + HOUR)
            for s in (start - HOUR, start, start + HOUR)
        )
        return Check(limit_id, "p", "tokens", cap, periods=periods, split=True)

    # partition 1 uses all of its even part (20,000), then goes quiet; partition 0 asks for
    # much more, round after round
    assert isinstance(ask(engine, 1, "rsv_used", 20_000, budget(engine.spaces[1], CAP)), Granted)
    for round_ in range(1, 8):
        for i in range(30):
            ask(engine, 0, f"rsv_{round_}_{i}", 1_000, budget(engine.spaces[0], CAP))
        engine.frozen_ms = middle + 1_000 * round_
        allotments_round(engine, [[budget(space, CAP)] for space in engine.spaces])
        after = units(engine, 5)
        assert sum(after) == CAP
        assert after[1] >= 20_000  # what it used stays its own
    assert after[1] < 21_000 and after[0] > 38_000, after  # the rest went to the asker
    used = sum(int(engine.client.get(budget(s, CAP).periods[1].key) or 0) for s in engine.spaces)
    assert used <= CAP


def test_one_tenant_using_most_of_a_pool_still_gets_nine_tenths_of_it_per_minute(
    engine: Engine,
) -> None:
    """A pool of 60,000 tokens a minute over 3 partitions. One tenant asks for 150% of it
    (500 tokens every 5 ms) while two tenants on the other partitions ask for 5% each (50
    tokens a second); a round each second. In the second minute the pool admits at
    least 90% of its capacity, the light tenants all they ask, and never more than it has."""
    admitted = {0: 0, 1: 0, 2: 0}
    asked = {0: 0, 1: 0, 2: 0}
    second_minute = 0
    for step in range(24_000):  # 5 ms steps: 2 minutes
        now = NOW + step * 5
        engine.frozen_ms = now
        if step and step % 200 == 0:
            rebalance(engine)
        asks = [(0, 500)]
        if step % 200 == 100:
            asks += [(1, 50), (2, 50)]
        for tenant, tokens in asks:
            got = ask(
                engine,
                tenant,
                f"rsv_{step}_{tenant}",
                tokens,
                pool_bucket(engine.spaces[tenant], CAP),
            )
            if step >= 12_000:
                asked[tenant] += tokens
            if isinstance(got, Granted):
                if step >= 12_000:
                    admitted[tenant] += tokens
                    second_minute += tokens
            else:
                assert isinstance(got, Refused)
    print(f"\nsecond minute: admitted {second_minute} of {CAP} ({admitted})")
    assert second_minute >= 0.9 * CAP
    assert second_minute <= 2 * CAP  # a minute's refill and at most the buckets' depth
    for light in (1, 2):
        assert admitted[light] >= 0.95 * asked[light], (admitted, asked)


PROCESSES = 3
SECONDS = 4.0


def _reported(out: str, work: Callable[[], dict[str, Any]]) -> None:
    """A forked process's work: its result, or its traceback, written to `out`."""
    try:
        result = work()
    except BaseException:
        result = {"error": traceback.format_exc()}
    Path(out).write_text(json.dumps(result))


def _hammer(tenant: int, out: str, stop_at: float, tokens: int, pause: float) -> None:
    """A forked process with its own connection: reserves on its tenant's partition."""

    def work() -> dict[str, Any]:
        engine = Engine(_client(), hash_tag="allot", partitions=PARTS)
        check = pool_bucket(engine.tenant_space(tenant), 6_000)
        i = 0
        while time.time() < stop_at:
            ask(engine, tenant, f"rsv_{tenant}_{i}", tokens, check)
            i += 1
            time.sleep(pause)
        return {"asks": i}

    _reported(out, work)


def _rebalancer(
    out: str, stop_at: float, tag: str, checks_of: Callable[[KeySpace], list[Check]]
) -> None:
    """A forked process moving the units of `checks_of(partition)` 20 times a second."""

    def work() -> dict[str, Any]:
        engine = Engine(_client(), hash_tag=tag, partitions=PARTS)
        rounds = 0
        while time.time() < stop_at:
            allotments_round(engine, [checks_of(s) for s in engine.spaces])
            rounds += 1
            time.sleep(0.05)
        return {"rounds": rounds}

    _reported(out, work)


def _with_rebalancer(
    tmp_path: Path,
    worker: Callable[..., None],
    args_of: Callable[[int], tuple[Any, ...]],
    tag: str,
    checks_of: Callable[[KeySpace], list[Check]],
) -> list[dict[str, Any]]:
    """PROCESSES forked `worker(i, out, stop_at, *args_of(i))`, one a partition, beside a
    `_rebalancer` of `checks_of`, for SECONDS; what each reported (the rebalancer's last),
    once every one exited cleanly."""
    context = multiprocessing.get_context("fork")
    stop_at = time.time() + SECONDS
    outputs = [tmp_path / f"p{i}.json" for i in range(PROCESSES + 1)]
    processes = [
        context.Process(target=worker, args=(i, str(outputs[i]), stop_at, *args_of(i)), daemon=True)
        for i in range(PROCESSES)
    ]
    processes.append(
        context.Process(
            target=_rebalancer, args=(str(outputs[-1]), stop_at, tag, checks_of), daemon=True
        )
    )
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    results = [json.loads(path.read_text()) for path in outputs]
    assert not [r["error"] for r in results if "error" in r]
    return results


def _client() -> redis.Redis:
    """A new connection to the store in a forked process (the parent's must not be shared)."""
    get_redis.cache_clear()
    return get_redis()


def test_processes_on_every_partition_never_admit_more_than_the_limit_while_it_moves(
    engine: Engine, tmp_path: Path
) -> None:
    """6,000 tokens a minute shared by tenants on 3 partitions, each in its own process, one
    asking much more than the others, with a rebalancing process moving the units 20 times a
    second. From the grants in every partition's stream: between any two instants, the pool
    admitted at most its depth plus its refill."""
    results = _with_rebalancer(
        tmp_path,
        _hammer,
        lambda i: (100, 0.002 if i == 0 else 0.05),
        "allot",
        lambda s: [pool_bucket(s, 6_000)],
    )
    grants = sorted(
        (int(f[b"at_ms"]), int(f[b"reserved_input_tokens"]) + int(f[b"granted_output_tokens"]))
        for space in engine.spaces
        for _, f in engine.client.xrange(space.events)
        if f[b"type"] == b"reserved"
    )
    assert results[-1]["rounds"] > 10
    total = sum(tokens for _, tokens in grants)
    # not a quiet run: the pool was used (units moved away from a partition take its tokens
    # with them, so a loaded machine may admit less than the depth)
    assert len(grants) >= 20 and total >= 2_000, (len(grants), total)
    # the bound between any two grants: depth + refill since (buckets start full)
    worst = -float("inf")
    for i, (start, _) in enumerate(grants):
        admitted = 0
        for at, tokens in grants[i:]:
            admitted += tokens
            allowed = 6_000 + (at - start) * 6_000 / 60_000
            worst = max(worst, admitted - allowed)
    print(f"\n{len(grants)} grants of {total} tokens; closest to the bound: {worst:.0f} tokens")
    assert worst <= 0


def test_a_raised_amount_never_makes_the_parts_add_up_past_it(engine: Engine) -> None:
    """A round writes only the parts that move: here 40 and 27 of 100, partition 2 keeping
    its even 33 unwritten. Raised to 1,000, the written parts stay as they are until the
    rebalancer hands out the new units, and the unwritten one reads its even part of 1,000:
    at most 1,000 together (scaled up, 400 + 270 + 333 = 1,003)."""
    for i, asked in enumerate([80, 54, 66]):
        engine.client.hset(engine.spaces[i].allot, "e1", asked)
    allotments_round(engine, [[pool_bucket(space, 100)] for space in engine.spaces])
    assert engine.client.hget(engine.spaces[2].allot, "1") is None
    engine.frozen_ms = NOW + 120_000  # every part full
    held = []
    for i, space in enumerate(engine.spaces):
        refused = ask(engine, i, f"rsv_all_{i}", 10**9, pool_bucket(space, 1_000))
        assert isinstance(refused, Refused)
        held.append(refused.remaining)
    assert held == [40, 27, 333] and sum(held) <= 1_000


def test_a_partition_holding_nothing_admits_nothing_at_a_reduced_share(engine: Engine) -> None:
    """A pool limit of 10 requests a minute held [10, 0, 0] at an adaptive share of 0.9: the
    partitions holding nothing admit nothing (a share never rounds nothing up to one unit),
    and the three together at most 9."""

    def option(space: KeySpace) -> tuple[Check, Pressure]:
        check = Check(1, "b", "requests", 10, key=space.bucket(1), split=True, pool_limit=True)
        return check, with_(pressure(engine, 5), key=space.pressure(5))

    for space, units_ in zip(engine.spaces, [10, 0, 0], strict=True):
        engine.allotments_move(space, [option(space)[0]], {1: units_})
        engine.client.hset(space.pressure(5), "s", 0.9)
    admitted = []
    for i, space in enumerate(engine.spaces):
        granted = 0
        for _ in range(15):
            check, bp = option(space)
            decided = engine.reserve(
                call(
                    engine.reservation_id(i),
                    check,
                    tenant_id=i,
                    input_tokens=1,
                    max_output_tokens=1,
                    min_output_tokens=1,
                    options=(PoolOption("main", (check,), bp),),
                )
            )
            granted += isinstance(decided, Granted)
        admitted.append(granted)
    assert admitted[1:] == [0, 0] and 0 < admitted[0] <= 9, admitted


def test_no_round_moves_units_while_a_partition_waits_for_its_rebuild(engine: Engine) -> None:
    """A partition that lost its data reads as having used nothing: a round then would give
    its spent budget away. Rounds wait until its rebuild wrote its version back."""
    start = NOW - NOW % HOUR
    engine.frozen_ms = start + HOUR // 2

    def budget(space: KeySpace) -> Check:
        periods = tuple(
            Period(space.period(5, s), s, s + HOUR) for s in (start - HOUR, start, start + HOUR)
        )
        return Check(5, "p", "tokens", 99, periods=periods, split=True)

    assert isinstance(ask(engine, 1, "rsv_spent", 33, budget(engine.spaces[1])), Granted)
    for key in engine.client.scan_iter(match=engine.spaces[1].prefix + "*"):
        engine.client.delete(key)  # partition 1 lost its data, its version with it
    for i in range(20):
        ask(engine, 0, f"rsv_{i}", 10, budget(engine.spaces[0]))
    engine.frozen_ms += 1_000

    moved = allotments_round(engine, [[budget(space)] for space in engine.spaces], version=3)

    assert moved.units == 0
    assert [engine.client.hget(space.allot, "5") for space in engine.spaces] == [None] * PARTS
    engine.client.set(engine.spaces[1].version, 3)  # rebuilt
    checks = [[budget(space)] for space in engine.spaces]
    assert allotments_round(engine, checks, version=3).units > 0


def test_a_round_that_outlived_its_lock_gives_nothing_once_a_newer_round_ran(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """12 slots asked for on partition 0. Round A takes from partitions 1 and 2 and stalls
    past its lock before giving; meanwhile the asks move to partition 2 and round B runs
    whole. A, resuming, gives nothing: the slots never add up past 12."""

    def slots(space: KeySpace) -> Check:
        return Check(4, "c", "concurrent", 12, key=space.concurrency(4), split=True)

    checks = [[slots(space)] for space in engine.spaces]
    for space, asked in zip(engine.spaces, [24, 0, 0], strict=True):
        engine.client.hset(space.allot, "e4", asked)
    move = Engine.allotments_move
    moves = []

    def stalling(self: Engine, *args: Any, **kw: Any) -> Any:
        moves.append(args[0].index)
        if len(moves) == 4:  # A has taken, and is about to give: its lock expires, B runs
            self.client.delete(self.keys.prefix + "allot_lock")
            for space, asked in zip(self.spaces, [0, 0, 24], strict=True):
                self.client.hset(space.allot, "e4", asked)
            monkeypatch.setattr(Engine, "allotments_move", move)
            assert allotments_round(self, checks).limits == 1
        return move(self, *args, **kw)

    monkeypatch.setattr(Engine, "allotments_move", stalling)
    allotments_round(engine, checks)

    held = [int(engine.client.hget(space.allot, "4").split(b":")[0]) for space in engine.spaces]
    assert sum(held) <= 12, held
    assert held[2] > held[0], held  # B's targets stand


def test_a_refund_after_a_partitions_part_shrank_refills_at_the_part_it_holds_now(
    engine: Engine,
) -> None:
    """A lease taken on partition 0 while it held 40,000 of a 60,000-token pool; then its
    part shrinks to 20,000 (partition 1 gets 40,000) and both are emptied. Committed 30 s
    later with 999 tokens unused, partition 0 holds what a bucket of 20,000 a minute refills in
    30 s and the refund: 10,999, not the 20,000 its old rate would have refilled."""
    spaces = engine.spaces
    checks = [[pool_bucket(space, CAP)] for space in spaces]
    engine.allotments_move(spaces[2], checks[2], {1: 0})
    engine.allotments_move(spaces[0], checks[0], {1: 40_000})
    lease = engine.reservation_id(0)
    assert isinstance(ask(engine, 0, lease, 1_000, pool_bucket(spaces[0], CAP)), Granted)
    engine.allotments_move(spaces[0], checks[0], {1: 20_000})
    engine.allotments_move(spaces[1], checks[1], {1: 40_000})
    engine.frozen_ms = NOW + 60_000  # both full
    assert isinstance(ask(engine, 0, "rsv_p0", 20_000, pool_bucket(spaces[0], CAP)), Granted)
    assert isinstance(ask(engine, 1, "rsv_p1", 40_000, pool_bucket(spaces[1], CAP)), Granted)
    engine.frozen_ms = NOW + 90_000

    engine.commit(reservation_id=lease, owner=Owner(0), usage=Usage(0, 1), version=3)

    refused = ask(engine, 0, "rsv_probe", 10**9, pool_bucket(spaces[0], CAP))
    assert isinstance(refused, Refused)
    assert refused.remaining == 10_000 + 999


def test_a_partition_that_lost_its_data_takes_back_only_what_the_others_leave(
    engine: Engine,
) -> None:
    """After rounds moved most of a pool to partition 0, partition 1 loses its keys: restored,
    it holds what 0 and 2 leave, not the even third a missing allotment reads as."""
    for i in range(50):
        ask(engine, 0, f"rsv_{i}", 5_000, pool_bucket(engine.spaces[0], CAP))
    engine.frozen_ms = NOW + 1_000
    rebalance(engine)
    before = units(engine)
    assert before[0] > 0.95 * CAP and sum(before) == CAP
    engine.client.delete(engine.spaces[1].allot)

    allotments_restore(engine, engine.spaces[1], [pool_bucket(engine.spaces[1], CAP)])
    after = units(engine)
    assert after[1] == CAP - before[0] - before[2]
    assert sum(after) == CAP


BUDGET = 100_000  # tokens in the hour, shared by the 3 partitions
SLOTS = 6  # reservations held at once, shared likewise


def _hour_checks(space: KeySpace, start: int) -> list[Check]:
    periods = tuple(
        Period(space.period(7, s), s, s + HOUR) for s in (start - HOUR, start, start + HOUR)
    )
    return [
        Check(7, "p", "tokens", BUDGET, periods=periods, split=True),
        Check(8, "c", "concurrent", SLOTS, key=space.concurrency(8), split=True),
    ]


def _holder(tenant: int, out: str, stop_at: float, start: int, burst: int, pause: float) -> None:
    """Reserves `burst` calls of 1,000 tokens in a row, holds them a moment, commits them."""

    def work() -> dict[str, Any]:
        engine = Engine(_client(), hash_tag="allotp", partitions=PARTS)
        checks = _hour_checks(engine.tenant_space(tenant), start)
        owner = Owner(tenant)
        i = 0
        while time.time() < stop_at:
            held = []
            for _ in range(burst):
                rid = engine.reservation_id(tenant)
                if isinstance(ask(engine, tenant, rid, 1_000, *checks), Granted):
                    held.append(rid)
                i += 1
            time.sleep(0.01)
            for rid in held:
                engine.commit(reservation_id=rid, owner=owner, usage=Usage(999, 1), version=3)
            time.sleep(pause)
        return {"asks": i}

    _reported(out, work)


def test_processes_never_spend_a_split_budget_twice_nor_hold_more_slots_than_it_has(
    redis_db: redis.Redis, tmp_path: Path
) -> None:
    """A budget of 100,000 tokens in the hour and 6 concurrent slots, shared by tenants on 3
    partitions, one process each (one asking in bursts of 4, the others of 2, more slowly),
    and a process moving the units 20 times a second. At the end the partitions' counters add
    up to at most the budget; from the usage streams, at no instant were more than 6
    reservations held (a settlement counted before a grant of the same millisecond)."""
    engine = Engine(get_redis(), hash_tag="allotp", partitions=PARTS)
    for space in engine.spaces:
        engine.client.set(space.version, 3)
    left_ms = HOUR - engine.now_ms() % HOUR
    if left_ms < (SECONDS + 10) * 1000:  # the budget's hour must not end during the run
        time.sleep(left_ms / 1000 + 0.1)
    start = engine.now_ms() // HOUR * HOUR
    results = _with_rebalancer(
        tmp_path,
        _holder,
        lambda i: (start, 4 if i == 0 else 2, 0.0 if i == 0 else 0.05),
        "allotp",
        lambda s: _hour_checks(s, start),
    )
    assert results[-1]["rounds"] > 10

    spent = sum(int(engine.client.get(s.period(7, start)) or 0) for s in engine.spaces)
    moves = []
    for space in engine.spaces:
        for _, f in engine.client.xrange(space.events):
            if f[b"type"] == b"reserved":
                moves.append((int(f[b"at_ms"]), 1))
            elif f[b"type"] == b"committed":
                moves.append((int(f[b"at_ms"]), -1))
    held = most = 0
    for _, step in sorted(moves):  # at one millisecond, -1 before +1
        held += step
        most = max(most, held)
    grants = sum(1 for _, step in moves if step == 1)
    print(f"\n{grants} grants, {spent} of {BUDGET} tokens spent, at most {most} held at once")
    assert spent <= BUDGET
    assert most <= SLOTS
    assert spent >= BUDGET // 2 and most >= SLOTS // 2, "the limits should have been reached"


def test_a_partition_keeps_its_features_guarantees_while_another_asks_for_everything(
    engine: Engine,
) -> None:
    for i in range(50):
        ask(engine, 0, f"rsv_{i}", 5_000, pool_bucket(engine.spaces[0], CAP))
    engine.frozen_ms = NOW + 1_000
    checks = [[pool_bucket(space, CAP)] for space in engine.spaces]
    allotments_round(engine, checks, kept={1: [0, 0, 20_000]})
    after = units(engine)
    assert sum(after) == CAP and after[2] >= 20_000 and after[0] >= 39_000, after


def test_the_guarantees_kept_are_each_tenant_s_on_its_partition(world: Any) -> None:
    """A pool's capacity limit keeps, on each partition, the guarantees of its tenants'
    features on that pool and metric (with 3 partitions, whatever the store has)."""
    from quotas.allotments import guarantees_kept
    from quotas.plan import plans

    capacity = world.limit(pool=world.pool, metric="tokens", amount=100_000)
    world.limit(pool=world.pool, metric="requests", amount=500)
    world.limit(
        tenant=world.tenant, feature=world.chat, pool=world.pool, metric="tokens",
        guaranteed=20_000,
    )  # fmt: skip
    kept = guarantees_kept(plans.get(), 3)
    expected = [0, 0, 0]
    expected[world.tenant.pk % 3] = 20_000
    assert kept == {capacity.id: expected}
