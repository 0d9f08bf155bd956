"""Rules on a feature's recent traffic, read from the ledger's rollups: each fires when its
rate is crossed, not at the rate itself (the near miss), once while it holds, and resolves
when traffic is back to normal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.core import mail

from alerts.models import Alert, AlertRule
from alerts.services import alerts_run
from ledger.models import Grain, Refusal, UsageEvent, UsageRollup
from quotas.store import get_engine
from tests.fixtures import World

NOW = datetime(2031, 5, 6, 12, 0, tzinfo=UTC)


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def traffic(world: World, minutes_ago: int = 5, grain: str = Grain.MINUTE, **counts: int) -> None:
    """One rollup row of the chat feature, as the ledger would have written it."""
    start = NOW - timedelta(minutes=minutes_ago)
    if grain == Grain.HOUR:
        start = start.replace(minute=0)
    UsageRollup.objects.create(
        grain=grain,
        start=start,
        tenant=world.tenant.slug,
        feature=world.chat.slug,
        pool=world.pool.slug,
        model=world.model.name,
        **counts,
    )


def run(at: datetime = NOW) -> None:
    get_engine().frozen_ms = ms(at)  # the live counters are read at the same moment
    alerts_run(now_ms=ms(at))


def kinds() -> list[str]:
    return sorted(Alert.objects.filter(state="firing").values_list("kind", flat=True))


@pytest.mark.parametrize(
    ("counts", "fires"),
    [
        ({"requests": 100, "refused_rate_limited": 20, "refused_budget_exhausted": 10}, True),
        ({"requests": 100, "refused_rate_limited": 25}, False),  # 25 of 125: 20%, not above
        ({"requests": 5, "refused_concurrency": 5}, False),  # too few to judge
    ],
)
def test_refusal_spike(world: World, counts: dict[str, int], fires: bool) -> None:
    traffic(world, **counts)
    run()
    assert kinds() == (["refusal_spike"] if fires else [])


@pytest.mark.parametrize(("hits", "fires"), [(6, True), (5, False)])
def test_upstream_429s_above_the_rate(world: World, hits: int, fires: bool) -> None:
    traffic(world, requests=100, upstream_429=hits)
    run()
    assert kinds() == (["upstream_429"] if fires else [])


@pytest.mark.parametrize(("expired", "fires"), [(6, True), (5, False)])  # of 100 + expired
def test_expired_leases_above_the_rate(world: World, expired: int, fires: bool) -> None:
    traffic(world, requests=95, released=5, expired=expired)
    run()
    assert kinds() == (["expired_leases"] if fires else [])


@pytest.mark.parametrize(
    ("baseline", "now", "fires"),
    [
        (20, 10, True),  # 2% of commits last week, 10% now
        (20, 5, False),  # 5% now: not above the floor
        (100, 15, False),  # 10% last week: 15% is under twice its baseline
        (100, 21, True),  # 21%: above twice its baseline
    ],
)
def test_silent_truncation_against_the_features_own_baseline(
    world: World, baseline: int, now: int, fires: bool
) -> None:
    for day in range(1, 6):
        traffic(world, minutes_ago=day * 24 * 60, grain=Grain.HOUR, requests=200, truncated=0)
    traffic(world, minutes_ago=2 * 24 * 60 + 120, grain=Grain.HOUR, truncated=baseline)
    traffic(world, requests=100, truncated=now)
    run()
    assert kinds() == (["truncation"] if fires else [])


def test_truncation_words_name_the_incident(world: World) -> None:
    traffic(world, requests=100, truncated=30)
    run()
    [sent] = mail.outbox
    assert "30% of responses cut off at max_tokens" in sent.subject
    assert "every call answers 200" in sent.body


def test_soft_or_shadow_limits_that_would_refuse(world: World) -> None:
    shadow = world.limit(
        tenant=world.tenant,
        feature=world.chat,
        metric="tokens",
        window="day",
        amount=100,
        enforcement="shadow",
    )
    traffic(world, requests=3, would_refuse=2)
    for n in range(2):
        UsageEvent.objects.create(
            rid=f"rsv_{n}",
            state="committed",
            tenant="acme",
            feature="chat",
            would_refuse=str(shadow.pk),
            finished_ms=ms(NOW) - 60_000,
            ingested_ms=ms(NOW),
        )
    run()
    [alert] = Alert.objects.filter(kind="would_refuse")
    assert alert.details["limits"] == {"acme / chat: 100 tokens per day, shadow (not enforced)": 2}
    assert "would have refused 2 reservations" in mail.outbox[0].subject
    assert "acme / chat: 100 tokens per day, shadow (not enforced) (2)." in mail.outbox[0].body


def test_no_would_refuse_no_alert(world: World) -> None:
    traffic(world, requests=3, would_refuse=0)
    run()
    assert kinds() == []


def test_a_health_alert_fires_once_and_resolves_when_traffic_is_normal(world: World) -> None:
    traffic(world, requests=100, upstream_429=20)
    run()
    run(NOW + timedelta(minutes=1))
    assert Alert.objects.count() == 1 and len(mail.outbox) == 1
    run(NOW + timedelta(minutes=30))  # the window has moved past the burst
    [alert] = Alert.objects.all()
    assert (alert.state, alert.resolve_reason) == ("resolved", "back to normal")
    assert mail.outbox[1].subject == "[LLM quota] acme/chat: Provider 429s back to normal"


def test_a_features_rule_override_wins_over_its_tenants(world: World) -> None:
    AlertRule.objects.create(tenant=world.tenant, kind="upstream_429", threshold=Decimal("0.5"))
    AlertRule.objects.create(
        tenant=world.tenant, feature=world.chat, kind="upstream_429", threshold=Decimal("0.1")
    )
    traffic(world, requests=100, upstream_429=11)
    run()
    assert kinds() == ["upstream_429"]


def test_an_override_changes_the_window_and_the_minimum(world: World) -> None:
    AlertRule.objects.create(
        tenant=world.tenant, kind="refusal_spike", window_minutes=120, min_events=2
    )
    traffic(world, minutes_ago=90, requests=3, refused_rate_limited=3)
    run()
    assert kinds() == ["refusal_spike"]


def test_other_features_traffic_is_not_yours(world: World) -> None:
    UsageRollup.objects.create(
        grain=Grain.MINUTE,
        start=NOW - timedelta(minutes=5),
        tenant="acme",
        feature="batch",
        requests=100,
        upstream_429=50,
    )
    run()
    [alert] = Alert.objects.all()
    assert alert.feature == world.batch
    assert mail.outbox[0].to == [world.batch.owner.email]


def refused(world: World, limit_id: int, n: int, reason: str = "rate_limited") -> None:
    """n refusals of chat reservations by one limit, as the ledger stores them."""
    for i in range(n):
        Refusal.objects.create(
            rid=f"rsv_{limit_id}_{i}",
            at_ms=ms(NOW - timedelta(minutes=5)),
            tenant=world.tenant.slug,
            feature=world.chat.slug,
            model=world.model.name,
            reason=reason,
            limit_id=limit_id,
            ingested_ms=ms(NOW),
        )


def test_a_refusal_spike_names_the_limits_that_refused_and_whose_they_are(world: World) -> None:
    pool_limit = world.limit(pool=world.pool, metric="tokens", amount=1_000)
    own = world.limit(tenant=world.tenant, feature=world.chat, metric="requests", amount=50)
    traffic(world, requests=60, refused_rate_limited=40)
    refused(world, pool_limit.pk, 30)
    refused(world, own.pk, 10)
    # the batch feature used most of the pool: pausing it is what frees the chat's calls
    UsageRollup.objects.create(
        grain=Grain.MINUTE,
        start=NOW - timedelta(minutes=3),
        tenant=world.tenant.slug,
        feature=world.batch.slug,
        pool=world.pool.slug,
        model=world.model.name,
        requests=500,
        input_tokens=90_000,
    )
    run()
    [sent] = mail.outbox
    assert sent.subject == (
        "[LLM quota] acme/chat: 40% of reservations refused by shared: 1,000 tokens per minute"
    )
    assert (
        "Calls are being refused by shared: 1,000 tokens per minute (the shared pool's, 75% of "
        "the refusals); acme / chat: 50 requests per minute (the feature's own, 25% of the "
        "refusals)." in sent.body
    )
    assert "acme/batch used the most of it." in sent.body
    # what to do, each a link to the page that does it
    assert f"/admin/quotas/limit/{pool_limit.pk}/boost/" in sent.body
    assert f"/admin/tenants/feature/{world.batch.pk}/change/" in sent.body


def test_a_resolve_reports_the_rates_when_it_resolved(world: World) -> None:
    traffic(world, minutes_ago=20, requests=100, upstream_429=10)
    run(NOW - timedelta(minutes=14))
    traffic(world, minutes_ago=5, requests=190, upstream_429=1)
    run()  # the 15 minutes now hold 190 commits, one 429
    resolved = mail.outbox[-1]
    assert resolved.subject == "[LLM quota] acme/chat: Provider 429s back to normal"
    assert "Now: 1 of 190 commits in the last 15 minutes reported an upstream 429" in (
        resolved.body
    )
