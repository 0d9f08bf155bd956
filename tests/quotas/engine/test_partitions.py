"""Partitions of the quota state against the store the tests run on (one Redis, or the
cluster of the cluster pass): where a tenant's decisions live, and the allotments of the
limits that tenants of several partitions share (quotas/lua/allot.lua)."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from quotas.engine import Check, Engine, Granted, Owner, PoolOption, Refused, Settled, Usage
from quotas.engine.core import KeySpace
from quotas.engine.partitions import partition_tags, reservation_partition
from quotas.store import get_redis
from tests.quotas.engine.test_core import HOUR, NOW, call

PARTS = 3


@pytest.fixture
def engine(redis_db: redis.Redis) -> Engine:
    engine = Engine(get_redis(), hash_tag="part", partitions=PARTS, retention_ms=HOUR)
    engine.frozen_ms = NOW
    for space in engine.spaces:
        engine.client.set(space.version, 3)
    return engine


def pool_bucket(space: KeySpace, cap: int, limit_id: int = 1, **kw: Any) -> Check:
    """A pool's own limit, shared by every tenant: split on partitions."""
    return Check(limit_id, "b", "tokens", cap, key=space.bucket(limit_id), split=True, **kw)


def ask(engine: Engine, tenant: int, rid: str, tokens: int, *checks: Check) -> Any:
    """A reserve of `tokens` (all but one input, one output token) by `tenant`."""
    return engine.reserve(
        call(
            rid,
            *checks,
            tenant_id=tenant,
            input_tokens=tokens - 1,
            max_output_tokens=1,
            min_output_tokens=1,
            options=(PoolOption("main", checks),),
        )
    )


def test_each_partition_s_tag_lands_in_its_own_range_of_slots() -> None:
    for count in (2, 3, 12, 48):
        tags = partition_tags("quota", count)
        width = REDIS_CLUSTER_HASH_SLOTS / count
        for index, tag in enumerate(tags):
            assert index * width <= key_slot(tag.encode()) < (index + 1) * width
    assert partition_tags("quota", 1) == ("quota",)  # one Redis: the keys of old
    with pytest.raises(ValueError):
        partition_tags("quota", 257)


def test_a_tenant_s_reservation_lives_on_its_partition_and_is_settled_by_its_id(
    engine: Engine,
) -> None:
    for tenant in range(PARTS):
        space = engine.tenant_space(tenant)
        rid = engine.reservation_id(tenant)
        assert reservation_partition(rid, PARTS) == space.index == tenant
        assert len(rid) == len("rsv_") + 24
        checks = (Check(9, "b", "tokens", 10_000, key=space.bucket(9)),)
        granted = ask(engine, tenant, rid, 100, *checks)
        assert isinstance(granted, Granted)
        assert engine.client.exists(space.lease(rid))
        assert [f[b"rid"] for _, f in engine.client.xrange(space.events)] == [rid.encode()]
        settled = engine.commit(
            reservation_id=rid, owner=Owner(tenant), usage=Usage(50, 1), version=3
        )
        assert isinstance(settled, Settled)
    # every partition's stream holds its own tenant's events only
    assert [engine.client.xlen(s.events) for s in engine.spaces] == [2, 2, 2]


def test_a_shared_limit_is_split_evenly_until_the_rebalancer_moves_it(engine: Engine) -> None:
    """3,000 tokens a minute over 3 partitions: 1,000 each. The answer's cap is the whole
    limit; the refusal of a partition out of its part says to come back after a rebalance."""
    granted = ask(engine, 0, "rsv_a", 1_000, pool_bucket(engine.spaces[0], 3_000))
    assert isinstance(granted, Granted)
    assert granted.limits[0].cap == 3_000 and granted.limits[0].remaining == 0
    refused = ask(engine, 0, "rsv_b", 10, pool_bucket(engine.spaces[0], 3_000))
    assert isinstance(refused, Refused) and refused.reason == "rate_limited"
    assert refused.retry_after_ms == 600  # 10 tokens at 1,000 a minute
    # the others still hold their thousand each
    for tenant in (1, 2):
        got = ask(engine, tenant, f"rsv_{tenant}", 1_000, pool_bucket(engine.spaces[tenant], 3_000))
        assert isinstance(got, Granted)
    # more than a partition's part never fits there until it moves: retry after a round
    too_big = ask(engine, 1, "rsv_c", 1_500, pool_bucket(engine.spaces[1], 3_000))
    assert isinstance(too_big, Refused) and too_big.retry_after_ms == engine.rebalance_ms


def test_an_amount_that_does_not_divide_is_split_to_the_unit(engine: Engine) -> None:
    """10 a minute over 3 partitions: 4, 3 and 3, never 3 x 4."""
    admitted = []
    for tenant in range(PARTS):
        space = engine.tenant_space(tenant)
        check = Check(2, "b", "requests", 10, key=space.bucket(2), split=True)
        count = 0
        for i in range(6):
            if isinstance(ask(engine, tenant, f"rsv_{tenant}_{i}", 10, check), Granted):
                count += 1
        admitted.append(count)
    assert admitted == [4, 3, 3]


def test_a_budget_and_a_concurrency_limit_split_their_caps(engine: Engine) -> None:
    space = engine.spaces[2]
    start = NOW - NOW % HOUR
    budget = Check(
        3,
        "p",
        "tokens",
        100,
        periods=(
            _period(space, 3, start - HOUR, start),
            _period(space, 3, start, start + HOUR),
            _period(space, 3, start + HOUR, start + 2 * HOUR),
        ),
        split=True,
    )
    assert isinstance(ask(engine, 2, "rsv_a", 33, budget), Granted)  # 34, 33, 33: 33 here
    assert isinstance(ask(engine, 2, "rsv_b", 1, budget), Refused)
    slots = Check(4, "c", "concurrent", 5, key=space.concurrency(4), split=True)
    assert isinstance(ask(engine, 2, "rsv_c", 1, slots), Granted)  # 2, 2, 1: one here
    refused = ask(engine, 2, "rsv_d", 1, slots)
    assert isinstance(refused, Refused) and refused.reason == "concurrency"


def _period(space: KeySpace, limit_id: int, start: int, stop: int) -> Any:
    from quotas.engine.types import Period

    return Period(space.period(limit_id, start), start, stop)


def test_a_provider_429_on_one_partition_is_heard_on_the_others(engine: Engine) -> None:
    """A release reporting a provider 429 on partition 0 names the pool to spread it to;
    spread to partition 1, that partition's share drops once (the cooldown holds a second
    spread) and its part of the pool is emptied; partition 2, not told, is untouched."""
    from dataclasses import replace as with_

    from quotas.engine.types import Report
    from tests.quotas.engine.test_pressure import pressure

    def option(space: KeySpace) -> tuple[Check, Any]:
        bp = with_(pressure(engine, 5), key=space.pressure(5))
        check = Check(1, "b", "tokens", 3_000, key=space.bucket(1), split=True, pool_limit=True)
        return check, bp

    def reserve(tenant: int, rid: str) -> Any:
        check, bp = option(engine.spaces[tenant])
        return engine.reserve(
            call(rid, check, tenant_id=tenant, input_tokens=99, max_output_tokens=1,
                 min_output_tokens=1, options=(PoolOption("main", (check,), bp),))
        )  # fmt: skip

    assert isinstance(reserve(0, engine.reservation_id(0)), Granted)
    rid = engine.reservation_id(0)
    assert isinstance(reserve(0, rid), Granted)
    settled = engine.release(
        reservation_id=rid, owner=Owner(0), version=3, report=Report(status=429)
    )
    assert isinstance(settled, Settled) and settled.spread == "main"
    check, bp = option(engine.spaces[1])
    assert engine.spread_429(engine.spaces[1], "main", bp, [check]) == pytest.approx(0.7)
    assert engine.spread_429(engine.spaces[1], "main", bp, [check]) == pytest.approx(0.7)
    refused = reserve(1, engine.reservation_id(1))
    assert isinstance(refused, Refused) and refused.reason == "rate_limited"
    assert isinstance(reserve(2, engine.reservation_id(2)), Granted)
    assert engine.client.hget(engine.spaces[2].pressure(5), "s") is None
    # a success settles without naming a pool
    granted = reserve(2, engine.reservation_id(2))
    done = engine.release(
        reservation_id=granted.reservation_id, owner=Owner(2), version=3, report=Report(200)
    )
    assert isinstance(done, Settled) and done.spread is None
