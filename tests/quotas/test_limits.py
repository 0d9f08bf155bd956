"""The limit semantics of docs/engine.md, each against the real Redis."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from quotas.models import Limit
from quotas.plan import plans
from quotas.reservations import get_engine, leases_expire
from quotas.usage import limit_states
from quotas.validation import limit_describe
from tests.factories import FeatureFactory, PoolFactory
from tests.fixtures import World
from tests.partitions import allot_shared


def state(limit: Limit) -> dict[str, Any]:
    """The live state of a limit as the engine sees it (used, remaining, reset_ms): on its
    tenant's partition, or summed over the partitions that share it."""
    [(_, found)] = limit_states(plans.get(), [plans.get().limits[limit.id]])
    return found


@pytest.fixture(autouse=True)
def frozen_clock() -> None:
    """Stop the engine's clock, so that refills happen only when a test says so."""
    engine = get_engine()
    engine.frozen_ms = None
    engine.frozen_ms = engine.now_ms()


def advance(seconds: float) -> None:
    engine = get_engine()
    assert engine.frozen_ms is not None
    engine.frozen_ms += int(seconds * 1000)


def commit(world: World, rid: str, **usage: Any) -> Any:
    return world.client().post(f"/api/v1/reservations/{rid}/commit", usage, format="json")


# 1. all or nothing -------------------------------------------------------------------------


def test_a_refusal_by_one_limit_debits_no_other_limit(world: World, reserve: Any) -> None:
    pool_tpm = world.limit(pool=world.pool, metric="tokens", amount=10_000)
    requests = world.limit(tenant=world.tenant, feature=world.chat, metric="requests", amount=1)
    assert reserve(input_tokens=100, max_output_tokens=100).status_code == 201
    before = state(pool_tpm)["remaining"]

    refused = reserve(input_tokens=100, max_output_tokens=100)

    assert refused.status_code == 429
    assert refused.json()["limit"]["id"] == requests.id
    assert state(pool_tpm)["remaining"] == pytest.approx(before, abs=1)


# 3. token buckets --------------------------------------------------------------------------


def test_minute_bucket_refills_continuously_up_to_its_amount(world: World, reserve: Any) -> None:
    tpm = world.limit(pool=world.pool, metric="tokens", amount=6000)
    assert reserve(input_tokens=3000, max_output_tokens=3000).status_code == 201
    assert state(tpm)["remaining"] == pytest.approx(0, abs=2)

    advance(10)  # 6000/60 = 100 tokens per second
    assert state(tpm)["remaining"] == pytest.approx(1000, abs=5)
    advance(3600)
    assert state(tpm)["remaining"] == 6000


def test_retry_after_is_exact_for_a_minute_limit(world: World, reserve: Any) -> None:
    world.limit(pool=world.pool, metric="tokens", amount=6000)
    assert reserve(input_tokens=5000, max_output_tokens=1000).status_code == 201

    refused = reserve(input_tokens=1000, max_output_tokens=500)
    assert refused.status_code == 429
    body = refused.json()
    assert body["error"] == "rate_limited"
    retry_ms = body["retry_after_ms"]
    assert retry_ms == pytest.approx(15_000, abs=50)  # 1,500 tokens at 100 per second
    assert int(refused.headers["Retry-After"]) == 15

    advance((retry_ms - 300) / 1000)
    assert reserve(input_tokens=1000, max_output_tokens=500).status_code == 429
    advance(0.3)
    assert reserve(input_tokens=1000, max_output_tokens=500).status_code == 201


def test_a_request_larger_than_the_limit_is_refused_without_a_retry_time(
    world: World, reserve: Any
) -> None:
    world.limit(pool=world.pool, metric="tokens", amount=1000)
    refused = reserve(input_tokens=900, max_output_tokens=200)
    assert refused.status_code == 429
    assert refused.json()["retry_after_ms"] is None
    assert "Retry-After" not in refused.headers


# 4. calendar budgets -----------------------------------------------------------------------


def _seconds_to_berlin_midnight() -> float:
    now = datetime.now(ZoneInfo("Europe/Berlin"))
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


def test_day_budget_resets_exactly_at_the_tenants_midnight(world: World, reserve: Any) -> None:
    world.limit(tenant=world.tenant, metric="tokens", window="day", amount=1000)
    advance(_seconds_to_berlin_midnight() - 5)  # five seconds before midnight in Berlin
    assert reserve(input_tokens=500, max_output_tokens=500).status_code == 201

    refused = reserve(input_tokens=10, max_output_tokens=10)
    assert refused.status_code == 429
    assert refused.json()["error"] == "budget_exhausted"
    assert int(refused.headers["Retry-After"]) in (5, 6)

    advance(4)
    assert reserve(input_tokens=10, max_output_tokens=10).status_code == 429
    advance(1.5)
    assert reserve(input_tokens=500, max_output_tokens=500).status_code == 201


def test_month_budget_counts_in_the_tenants_month(world: World, reserve: Any) -> None:
    budget = world.limit(tenant=world.tenant, metric="requests", window="month", amount=2)
    assert reserve().status_code == 201
    assert reserve().status_code == 201
    refused = reserve()
    assert refused.json()["error"] == "budget_exhausted"
    now = datetime.now(ZoneInfo("Europe/Berlin"))
    first = (now.replace(day=28) + timedelta(days=4)).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
    assert int(refused.headers["Retry-After"]) == pytest.approx(
        (first - now).total_seconds(), abs=2
    )
    assert state(budget)["used"] == 2


# 5. refund on commit -----------------------------------------------------------------------


def test_commit_refunds_unused_tokens_to_every_limit_at_once(world: World, reserve: Any) -> None:
    limits = [
        world.limit(pool=world.pool, metric="tokens", amount=100_000),
        world.limit(tenant=world.tenant, feature=world.chat, metric="tokens", amount=50_000),
        world.limit(tenant=world.tenant, metric="tokens", window="day", amount=1_000_000),
        world.limit(tenant=world.tenant, metric="output_tokens", window="hour", amount=90_000),
    ]
    granted = reserve(input_tokens=1000, max_output_tokens=7000)
    assert granted.status_code == 201
    day_used = state(limits[2])["used"]
    assert day_used == 8000

    done = commit(world, granted.json()["id"], input_tokens=400, output_tokens=100)

    assert done.status_code == 200
    assert done.json()["refunded"] == {
        "input_tokens": 600,
        "output_tokens": 6900,
        "cost_usd": pytest.approx(done.json()["refunded"]["cost_usd"]),
    }
    assert state(limits[0])["remaining"] == pytest.approx(100_000 - 500, abs=5)
    assert state(limits[1])["remaining"] == pytest.approx(50_000 - 500, abs=5)
    assert state(limits[2])["used"] == 500
    assert state(limits[3])["used"] == 100


def test_commit_over_the_reservation_is_charged_and_flagged(world: World, reserve: Any) -> None:
    day = world.limit(tenant=world.tenant, metric="tokens", window="day", amount=10_000)
    granted = reserve(input_tokens=100, max_output_tokens=100).json()
    done = commit(world, granted["id"], input_tokens=100, output_tokens=900)
    assert done.json()["overrun"] is True
    assert done.json()["refunded"]["output_tokens"] == -800
    assert state(day)["used"] == 1000


def test_commit_is_idempotent(world: World, reserve: Any) -> None:
    day = world.limit(tenant=world.tenant, metric="tokens", window="day", amount=10_000)
    rid = reserve(input_tokens=100, max_output_tokens=100).json()["id"]
    first = commit(world, rid, input_tokens=50, output_tokens=50)
    again = commit(world, rid, input_tokens=50, output_tokens=50)
    assert again.status_code == 200
    assert again.json() == first.json()
    assert state(day)["used"] == 100


def test_release_refunds_everything(world: World, reserve: Any) -> None:
    tpm = world.limit(pool=world.pool, metric="tokens", amount=10_000)
    day = world.limit(tenant=world.tenant, metric="requests", window="day", amount=10)
    rid = reserve(input_tokens=1000, max_output_tokens=1000).json()["id"]
    released = world.client().post(f"/api/v1/reservations/{rid}/release")
    assert released.status_code == 200
    assert released.json()["status"] == "released"
    assert state(tpm)["remaining"] == pytest.approx(10_000, abs=2)
    assert state(day)["used"] == 0


# 6. leases never leak ----------------------------------------------------------------------


def test_an_abandoned_lease_is_expired_charged_in_full_and_frees_its_slot(
    world: World, reserve: Any, redis_db: Any
) -> None:
    slots = world.limit(tenant=world.tenant, metric="concurrent", window="", amount=1)
    day = world.limit(tenant=world.tenant, metric="tokens", window="day", amount=100_000)
    rid = reserve(input_tokens=300, max_output_tokens=700, ttl_seconds=5).json()["id"]
    assert reserve().status_code == 429  # the one slot is held

    advance(6)
    assert leases_expire() == 1

    assert state(slots)["used"] == 0
    assert state(day)["used"] == 1000 + 0  # charged as reserved: the call may have happened
    shown = world.client().get(f"/api/v1/reservations/{rid}").json()
    assert shown["status"] == "expired"
    events = [f for _, f in redis_db.xrange(get_engine().tenant_space(world.tenant.id).events)]
    assert any(e[b"type"] == b"expired" and e[b"rid"] == rid.encode() for e in events)
    assert reserve().status_code == 201


def test_a_lease_past_its_expiry_is_expired_lazily_on_access(world: World, reserve: Any) -> None:
    slots = world.limit(tenant=world.tenant, metric="concurrent", window="", amount=1)
    rid = reserve(ttl_seconds=1).json()["id"]
    advance(2)
    assert world.client().get(f"/api/v1/reservations/{rid}").json()["status"] == "expired"
    assert state(slots)["used"] == 0


def test_a_commit_after_expiry_is_accepted_recorded_and_flagged(world: World, reserve: Any) -> None:
    day = world.limit(tenant=world.tenant, metric="tokens", window="day", amount=100_000)
    rid = reserve(input_tokens=300, max_output_tokens=700, ttl_seconds=1).json()["id"]
    advance(2)
    leases_expire()
    assert state(day)["used"] == 1000

    late = commit(world, rid, input_tokens=300, output_tokens=20)

    assert late.status_code == 200
    assert late.json()["lease_expired"] is True
    assert state(day)["used"] == 320  # the tokens really spent


def test_extend_moves_the_expiry(world: World, reserve: Any) -> None:
    rid = reserve(ttl_seconds=2).json()["id"]
    extended = world.client().post(
        f"/api/v1/reservations/{rid}/extend", {"ttl_seconds": 60}, format="json"
    )
    assert extended.status_code == 200
    advance(10)
    assert leases_expire() == 0
    assert world.client().get(f"/api/v1/reservations/{rid}").json()["status"] == "held"


# 7. protected headroom ---------------------------------------------------------------------


def test_a_batch_flood_cannot_take_the_protected_headroom(world: World, reserve: Any) -> None:
    world.pool.protect = {"interactive": 0.3}
    world.pool.save()
    pool_tpm = world.limit(pool=world.pool, metric="tokens", amount=100_000)
    batch_tokens = 0
    while (
        r := reserve(feature="batch", input_tokens=1000, max_output_tokens=1000)
    ).status_code == 201:
        batch_tokens += 2000
    assert batch_tokens == 70_000
    assert r.json()["limit"]["remaining"] == 0  # what is left for this caller
    assert state(pool_tpm)["remaining"] == 30_000
    assert reserve(feature="chat", input_tokens=10_000, max_output_tokens=10_000).status_code == 201


def test_a_request_may_lower_its_priority_and_then_meets_the_floor(
    world: World, reserve: Any
) -> None:
    world.pool.protect = {"interactive": 0.5}
    world.pool.save()
    world.limit(pool=world.pool, metric="tokens", amount=10_000)
    assert (
        reserve(
            feature="chat", priority="batch", input_tokens=5000, max_output_tokens=1
        ).status_code
        == 429
    )
    assert reserve(feature="chat", input_tokens=5000, max_output_tokens=1).status_code == 201


def test_starvation_story_interactive_is_untouched_by_a_batch_flood(
    world: World, reserve: Any
) -> None:
    """The noisy neighbour: one pool of 100,000 TPM, 30% protected for interactive traffic,
    a batch feature flooding at five times capacity, chat asking for 20,000 TPM."""
    world.pool.protect = {"interactive": 0.3}
    world.pool.save()
    world.limit(pool=world.pool, metric="tokens", amount=100_000)
    admitted = {"chat": 0, "batch": 0}
    refused = {"chat": 0, "batch": 0}

    def offer(feature: str, tokens: int) -> None:
        r = reserve(feature=feature, input_tokens=tokens // 2, max_output_tokens=tokens // 2)
        if r.status_code == 201:
            admitted[feature] += tokens
            commit(world, r.json()["id"], input_tokens=tokens // 2, output_tokens=tokens // 2)
        else:
            assert r.status_code == 429
            refused[feature] += 1

    for second in range(120):  # two minutes, one step per second
        if second == 60:
            admitted.update(chat=0, batch=0)  # measure the steady second minute
        for _ in range(5):
            offer("batch", 1666)  # 5 x 1,666 per second = five times the pool's capacity
        offer("chat", 334)  # 20,000 per minute
        advance(1)

    assert refused["chat"] == 0
    assert admitted["chat"] == 60 * 334
    # the batch feature still gets all the capacity chat leaves (100k - 20k), at least the
    # unprotected 70k: protection costs no more than the headroom it keeps
    assert admitted["batch"] >= 70_000
    assert admitted["batch"] + admitted["chat"] <= 100_000 + 1666


# 8. guarantees and ceilings ----------------------------------------------------------------


def test_a_guaranteed_share_cannot_be_taken_by_other_features(world: World, reserve: Any) -> None:
    world.limit(pool=world.pool, metric="tokens", amount=100_000)
    world.limit(
        tenant=world.tenant,
        feature=world.chat,
        pool=world.pool,
        metric="tokens",
        guaranteed=Decimal(20_000),
    )
    taken = 0
    while reserve(feature="batch", input_tokens=1000, max_output_tokens=1000).status_code == 201:
        taken += 2000
    assert taken == 80_000
    assert reserve(feature="chat", input_tokens=10_000, max_output_tokens=10_000).status_code == 201


def test_the_guaranteed_feature_can_also_use_unreserved_capacity(
    world: World, reserve: Any
) -> None:
    world.limit(pool=world.pool, metric="tokens", amount=100_000)
    world.limit(
        tenant=world.tenant,
        feature=world.chat,
        pool=world.pool,
        metric="tokens",
        guaranteed=Decimal(20_000),
        amount=Decimal(50_000),
    )
    taken = 0
    while reserve(feature="chat", input_tokens=1000, max_output_tokens=1000).status_code == 201:
        taken += 2000
    assert taken == 50_000  # its ceiling


def test_a_ceiling_caps_a_feature_and_capacity_nobody_needs_is_shared(
    world: World, reserve: Any
) -> None:
    other = FeatureFactory(tenant=world.tenant, slug="agent", priority="standard")
    world.limit(pool=world.pool, metric="tokens", amount=100_000)
    world.limit(
        tenant=world.tenant,
        feature=world.batch,
        pool=world.pool,
        metric="tokens",
        amount=Decimal(30_000),
    )
    plans.clear()
    batch = sum(
        2000
        for _ in range(40)
        if reserve(feature="batch", input_tokens=1000, max_output_tokens=1000).status_code == 201
    )
    agent = sum(
        2000
        for _ in range(60)
        if reserve(feature=other.slug, input_tokens=1000, max_output_tokens=1000).status_code == 201
    )
    assert batch == 30_000
    assert agent == 70_000  # everything the capped batch feature could not use


# 9. cost budgets ---------------------------------------------------------------------------


def test_cost_budget_uses_the_models_input_cached_and_output_prices(
    world: World, reserve: Any
) -> None:
    # gpt-4o-mini in the factory: $0.15 input, $0.075 cached input, $0.60 output per Mtok
    budget = world.limit(tenant=world.tenant, metric="cost_usd", window="month", amount="0.01")
    granted = reserve(input_tokens=10_000, max_output_tokens=10_000)
    assert granted.json()["reserved"]["cost_usd"] == pytest.approx(0.0075)
    assert state(budget)["used"] == 7_500_000  # nano-USD

    done = commit(
        world,
        granted.json()["id"],
        input_tokens=10_000,
        cached_input_tokens=4000,
        output_tokens=1000,
    )

    expected = 6000 * 0.15e-6 + 4000 * 0.075e-6 + 1000 * 0.60e-6
    assert done.json()["usage"]["cost_usd"] == pytest.approx(expected)
    assert state(budget)["used"] == round(expected * 1e9)
    refused = reserve(input_tokens=10_000, max_output_tokens=20_000)
    assert refused.json()["error"] == "budget_exhausted"


# 10. shadow and soft limits ----------------------------------------------------------------


@pytest.mark.parametrize("enforcement", ["soft", "shadow"])
def test_soft_and_shadow_limits_admit_and_record_what_they_would_refuse(
    world: World, reserve: Any, redis_db: Any, enforcement: str
) -> None:
    trial = world.limit(
        tenant=world.tenant,
        feature=world.chat,
        metric="tokens",
        amount=1000,
        enforcement=enforcement,
    )
    assert reserve(input_tokens=400, max_output_tokens=400).json()["would_refuse"] == []
    over = reserve(input_tokens=400, max_output_tokens=400)
    assert over.status_code == 201
    assert over.json()["would_refuse"] == [str(trial)]
    events = [f for _, f in redis_db.xrange(get_engine().tenant_space(world.tenant.id).events)]
    assert events[-1][b"would_refuse"] == str(trial.id).encode()


# partial grants ----------------------------------------------------------------------------


def test_a_partial_grant_gives_what_fits_when_the_caller_allows_it(
    world: World, reserve: Any
) -> None:
    world.limit(pool=world.pool, metric="tokens", amount=10_000)
    assert reserve(input_tokens=6000, max_output_tokens=1000).status_code == 201

    partial = reserve(input_tokens=1000, max_output_tokens=8000, min_output_tokens=500)
    assert partial.status_code == 201
    assert partial.json()["granted"] == {
        "output_tokens": pytest.approx(2000, abs=2),
        "partial": True,
    }
    assert (
        reserve(input_tokens=1000, max_output_tokens=8000, min_output_tokens=500).status_code == 429
    )


def test_without_min_output_tokens_a_grant_is_all_or_nothing(world: World, reserve: Any) -> None:
    world.limit(pool=world.pool, metric="tokens", amount=10_000)
    assert reserve(input_tokens=6000, max_output_tokens=1000).status_code == 201
    assert reserve(input_tokens=1000, max_output_tokens=8000).status_code == 429


# pools -------------------------------------------------------------------------------------


def test_the_first_pool_in_order_that_admits_is_used_and_named(world: World, reserve: Any) -> None:
    spare = PoolFactory(slug="spare", served_models=[world.model], position=5)
    world.pool.position = 1
    world.pool.save()
    world.limit(pool=world.pool, metric="requests", amount=1)
    world.limit(pool=spare, metric="requests", amount=1)
    assert reserve().json()["pool"] == world.pool.slug
    assert reserve().json()["pool"] == "spare"
    assert reserve().status_code == 429


def test_a_partial_grant_under_a_huge_cost_budget_is_decided_at_once(
    world: World, reserve: Any
) -> None:
    world.limit(tenant=world.tenant, metric="cost_usd", window="month", amount="1000000000000")
    granted = reserve(input_tokens=1000, max_output_tokens=4000, min_output_tokens=1)
    assert granted.status_code == 201
    assert granted.json()["granted"] == {"output_tokens": 4000, "partial": False}


# found in review ---------------------------------------------------------------------------


def _guaranteed_pool(world: World, capacity: int, guaranteed: int) -> Limit:
    pool_tpm = world.limit(pool=world.pool, metric="tokens", amount=capacity)
    world.limit(
        tenant=world.tenant,
        feature=world.chat,
        pool=world.pool,
        metric="tokens",
        guaranteed=Decimal(guaranteed),
    )
    return pool_tpm


def test_a_commit_refunds_the_shared_part_before_the_guarantee(world: World, reserve: Any) -> None:
    _guaranteed_pool(world, 60_000, 30_000)
    rid = reserve(feature="chat", input_tokens=20_000, max_output_tokens=20_000).json()["id"]
    commit(world, rid, input_tokens=20_000, output_tokens=15_000)  # 35k used, 30k of it guaranteed

    # the pool holds 25k; chat's guarantee is spent, so all 25k are batch's to use
    assert (
        reserve(feature="batch", input_tokens=12_500, max_output_tokens=12_500).status_code == 201
    )


def test_retry_after_counts_only_guarantees_that_are_refilling(world: World, reserve: Any) -> None:
    _guaranteed_pool(world, 60_000, 30_000)
    assert (
        reserve(feature="batch", input_tokens=15_000, max_output_tokens=15_000).status_code == 201
    )

    refused = reserve(feature="batch", input_tokens=14_000, max_output_tokens=14_000)
    assert refused.status_code == 429
    assert refused.json()["retry_after_ms"] == pytest.approx(28_000, abs=50)  # 1,000 per second
    advance(28)
    assert (
        reserve(feature="batch", input_tokens=14_000, max_output_tokens=14_000).status_code == 201
    )


def test_a_request_beyond_what_others_guarantees_leave_gets_no_retry_time(
    world: World, reserve: Any
) -> None:
    _guaranteed_pool(world, 60_000, 30_000)
    refused = reserve(feature="batch", input_tokens=20_000, max_output_tokens=20_000)
    assert refused.status_code == 429
    assert refused.json()["retry_after_ms"] is None


def test_protected_headroom_also_applies_to_a_pools_limit_for_one_model(
    world: World, reserve: Any
) -> None:
    world.pool.protect = {"interactive": 0.5}
    world.pool.save()
    world.limit(pool=world.pool, model=world.model, metric="tokens", amount=10_000)
    assert reserve(feature="batch", input_tokens=3000, max_output_tokens=2000).status_code == 201
    assert reserve(feature="batch", input_tokens=1, max_output_tokens=1).status_code == 429
    assert reserve(feature="chat", input_tokens=3000, max_output_tokens=2000).status_code == 201


# the plan reads limits as rows ---------------------------------------------------------------


def test_the_plan_names_scopes_and_caps_every_limit_as_the_limit_itself_does(
    world: World,
) -> None:
    now = timezone.now()
    made = [
        world.limit(pool=world.pool, metric="tokens", amount=100_000),
        world.limit(tenant=world.tenant, metric="cost_usd", window="month", amount=12.5),
        world.limit(
            tenant=world.tenant,
            feature=world.chat,
            pool=world.pool,
            metric="tokens",
            amount=50_000,
            guaranteed=Decimal(20_000),
        ),
        world.limit(
            tenant=world.tenant,
            feature=world.batch,
            pool=world.pool,
            metric="tokens",
            guaranteed=Decimal(5_000),
        ),
        world.limit(model=world.model, metric="requests", amount=600, enforcement="soft"),
        world.limit(tenant=world.tenant, metric="concurrent", window="", amount=8),
        world.limit(
            feature=world.chat,
            tenant=world.tenant,
            metric="input_tokens",
            window="day",
            amount=1_000_000,
            enforcement="shadow",
        ),
    ]
    boosted = made[0]
    boosted.boost_amount, boosted.boost_until = Decimal(150_000), now + timedelta(hours=1)
    boosted.save()
    plans.clear()

    plan = plans.get()

    for limit in made:
        info = plan.limits[limit.id]
        assert info.name == limit_describe(limit) == str(limit)
        assert info.amount == limit.amount_at(now)
        scope = {
            "tenant": limit.tenant.slug if limit.tenant else None,
            "feature": limit.feature.slug if limit.feature else None,
            "pool": limit.pool.slug if limit.pool else None,
            "model": limit.model.name if limit.model else None,
        }
        assert info.scope == {k: v for k, v in scope.items() if v is not None}
    assert plan.limits[boosted.id].amount == Decimal(150_000)
    assert plan.valid_until == boosted.boost_until.timestamp()


def test_limits_of_one_scope_and_metric_are_in_one_order_on_every_database(
    world: World,
) -> None:
    month = world.limit(tenant=world.tenant, metric="tokens", window="month", amount=3_000_000)
    day = world.limit(tenant=world.tenant, metric="tokens", window="day", amount=100_000)
    minute = world.limit(tenant=world.tenant, metric="tokens", window="minute", amount=10_000)

    expected = [day.id, minute.id, month.id]  # by window, then id
    assert [limit.id for limit in Limit.objects.filter(tenant=world.tenant)] == expected
    assert [info.id for info in plans.get().by_tenant[world.tenant.id]] == expected


def test_a_burst_admits_at_most_its_depth_at_once_and_refills_at_the_amount(
    world: World, reserve: Any
) -> None:
    limit = world.limit(pool=world.pool, metric="tokens", amount=60_000, burst=1_000)
    engine = get_engine()
    engine.frozen_ms = engine.now_ms()
    allot_shared(world.tenant.id)  # partitioned: read before the first reservation allots it
    assert state(limit)["remaining"] == 1_000  # a full bucket holds the burst

    first = reserve(input_tokens=400, max_output_tokens=100)
    assert first.status_code == 201
    shown = first.json()["limits"][0]
    assert (shown["limit"], shown["remaining"]) == (60_000, 500)
    assert state(limit)["remaining"] == 500 and state(limit)["reset_ms"] == engine.frozen_ms + 500
    assert reserve(input_tokens=500, max_output_tokens=100).status_code == 429
    engine.frozen_ms += 100  # 100 tokens back at 1,000 a second
    assert reserve(input_tokens=500, max_output_tokens=100).status_code == 201


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"window": "day", "amount": 100, "burst": 10}, "give a minute amount"),
        ({"amount": 100, "burst": 101}, "at most the amount"),
        ({"amount": 100, "burst": 0}, "greater than zero"),
        ({"amount": 100, "burst": Decimal("1.5")}, "whole number"),
    ],
)
def test_a_burst_must_fit_its_limit(world: World, fields: dict[str, Any], problem: str) -> None:
    limit = Limit(pool=world.pool, metric="tokens", **{"window": "minute", **fields})

    with pytest.raises(ValidationError) as refused:
        limit.full_clean()

    assert problem in " ".join(refused.value.message_dict["burst"])
