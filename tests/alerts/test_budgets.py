"""Budget rules on the live counters: thresholds (once per threshold and period, resolved
when usage is back under) and the forecast; routing of what they say to the owners."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.conf import settings
from django.core import mail
from django.utils import timezone

import alerts.services
import quotas.usage
from alerts.models import Alert, AlertRule, Delivery, Notification
from alerts.services import alerts_run
from ledger.models import Grain, UsageRollup
from quotas.boosts import limit_boost, limit_boost_end
from quotas.engine import Engine
from quotas.models import Limit
from quotas.store import get_engine, redis_client
from tests.factories import UserFactory
from tests.fakes.redis_server import wait_until
from tests.fixtures import DEAD_STORE, World

BERLIN = ZoneInfo("Europe/Berlin")
# Next year: budget keys expire (in Redis's real time) two days after their period ends, so
# the engine's clock is frozen in the future, never in the past.
YEAR = datetime.now(UTC).year + 1


def at(hour: int, minute: int = 0, day: int = 10) -> int:
    """A moment on March `day` next year in the tenant's time zone, as the engine's clock."""
    return int(datetime(YEAR, 3, day, hour, minute, tzinfo=BERLIN).timestamp() * 1000)


@pytest.fixture
def clock() -> Callable[[int], int]:
    def move(now_ms: int) -> int:
        get_engine().frozen_ms = now_ms
        return now_ms

    return move


@pytest.fixture
def budget(world: World) -> Limit:
    return world.limit(
        tenant=world.tenant, feature=world.chat, metric="tokens", window="day", amount=10_000
    )


@pytest.fixture
def daily(world: World, budget: Limit) -> Limit:
    """The budget, with forecasts turned off for the tenant: these tests are about thresholds."""
    AlertRule.objects.create(tenant=world.tenant, kind="forecast", enabled=False)
    return budget


def use(reserve: Callable[..., Any], tokens: int, feature: str = "chat") -> None:
    response = reserve(feature=feature, input_tokens=tokens - 100, max_output_tokens=100)
    assert response.status_code == 201, response.json()


def firing(kind: str = "threshold", **filters: Any) -> list[tuple[str, float]]:
    alerts = Alert.objects.filter(state="firing", kind=kind, **filters).order_by("level")
    return [(a.kind, a.level) for a in alerts]


def test_crossing_50_and_80_percent_fires_both_in_one_message_to_the_owner(
    world: World, daily: Limit, reserve: Any, clock: Any
) -> None:
    now = clock(at(9))
    use(reserve, 8_000)
    alerts_run(now_ms=now)
    assert firing(limit=daily) == [("threshold", 0.5), ("threshold", 0.8)]
    [sent] = mail.outbox
    assert sent.to == [world.chat.owner.email]
    # one line per limit: the highest threshold crossed names the other
    assert sent.subject == (
        "[LLM quota] acme/chat: 80% of the budget used: acme / chat: 10,000 tokens per day"
    )
    assert "80% of the budget used: acme / chat: 10,000 tokens per day" in sent.body
    assert "8,000 tokens of 10,000 tokens used (80%), 2,000 tokens left" in sent.body
    assert f"{YEAR}-03-11 00:00 Europe/Berlin" in sent.body  # the reset, in the tenant's zone
    assert f"/admin/quotas/limit/{daily.pk}/change/" in sent.body


def test_a_near_miss_fires_only_the_lower_threshold(
    world: World, daily: Limit, reserve: Any, clock: Any
) -> None:
    now = clock(at(9))
    use(reserve, 7_999)
    alerts_run(now_ms=now)
    assert firing() == [("threshold", 0.5)]


def test_each_threshold_fires_once_per_period(
    world: World, daily: Limit, reserve: Any, clock: Any
) -> None:
    clock(at(9))
    use(reserve, 6_000)
    for minute in range(0, 40, 10):  # beat runs again and again; usage moves a little
        alerts_run(now_ms=clock(at(9, minute)))
        use(reserve, 200)
    assert (
        Alert.objects.filter(kind="threshold").count() == 1
    )  # 50% only, fired once; 6,800 is under 80%
    alerts_run(now_ms=clock(at(11)))
    use(reserve, 1_200)  # 8,000: past 80%
    alerts_run(now_ms=clock(at(11, 1)))
    alerts_run(now_ms=clock(at(11, 2)))
    assert Alert.objects.filter(kind="threshold").count() == 2
    assert len(mail.outbox) == 2


def test_a_new_period_resolves_what_fired_in_the_last(
    world: World, daily: Limit, reserve: Any, clock: Any
) -> None:
    clock(at(22))
    use(reserve, 9_000)
    alerts_run(now_ms=at(22))
    alerts_run(now_ms=clock(at(0, 5, day=11)))
    assert firing() == []
    resolved = Alert.objects.filter(state="resolved")
    assert {a.resolve_reason for a in resolved} == {"a new period began"}
    _, resolved_message = sorted(mail.outbox, key=lambda m: "resolved" in m.subject)
    assert resolved_message.subject == (
        "[LLM quota] acme/chat: Back under 50% and 80%: acme / chat: 10,000 tokens per day"
    )
    assert "Resolved: a new period began." in resolved_message.body
    alerts_run(now_ms=clock(at(0, 6, day=11)))
    assert len(mail.outbox) == 2  # resolved once


def test_a_raised_limit_resolves_the_thresholds_usage_is_now_under(
    world: World, daily: Limit, reserve: Any, clock: Any
) -> None:
    now = clock(at(9))
    use(reserve, 8_500)
    alerts_run(now_ms=now)
    daily.amount = Decimal(15_000)  # 8,500 is now 57%
    daily.save()
    alerts_run(now_ms=clock(at(9, 1)))
    assert firing() == [("threshold", 0.5)]
    [back] = Alert.objects.filter(state="resolved")
    assert (back.level, back.resolve_reason) == (0.8, "usage is back under the threshold")


def test_alert_at_on_the_limit_overrides_the_defaults(
    world: World, reserve: Any, clock: Any
) -> None:
    limit = world.limit(
        tenant=world.tenant,
        feature=world.chat,
        metric="tokens",
        window="day",
        amount=10_000,
        alert_at=[0.9],
    )
    now = clock(at(9))
    use(reserve, 8_900)
    alerts_run(now_ms=now)
    assert firing() == []
    use(reserve, 200)
    alerts_run(now_ms=clock(at(9, 1)))
    assert firing(limit=limit) == [("threshold", 0.9)]


def test_a_rule_override_can_silence_thresholds_for_a_feature(
    world: World, daily: Limit, reserve: Any, clock: Any
) -> None:
    AlertRule.objects.create(
        tenant=world.tenant, feature=world.chat, kind="threshold", enabled=False
    )
    now = clock(at(9))
    use(reserve, 9_000)
    alerts_run(now_ms=now)
    assert firing(kind="threshold") == []


def test_a_tenant_wide_budget_alerts_the_tenant_owners_not_the_feature_owner(
    world: World, reserve: Any, clock: Any
) -> None:
    owners = [UserFactory(username="ops@acme.example"), UserFactory(username="cto@acme.example")]
    world.tenant.owners.add(*owners)
    world.limit(tenant=world.tenant, metric="cost_usd", window="month", amount=1)
    world.limit(tenant=world.tenant, metric="tokens", window="month", amount=10_000)
    now = clock(at(9))
    use(reserve, 9_000)  # 8,900 input at $0.15/M and 100 output at $0.60/M: under half a cent
    alerts_run(now_ms=now)
    [sent] = mail.outbox
    assert sorted(sent.to) == ["cto@acme.example", "ops@acme.example"]
    assert sent.subject.startswith("[LLM quota] acme: ")
    assert "80% of the budget used: acme: 10,000 tokens per month" in sent.body
    assert "USD" not in sent.body and "$" not in sent.body  # the cost budget is far away


def test_a_pool_capacity_budget_alerts_the_platform(world: World, reserve: Any, clock: Any) -> None:
    UserFactory(username="root@example.com", is_superuser=True)
    world.limit(pool=world.pool, metric="requests", window="hour", amount=2)
    now = clock(at(9))
    use(reserve, 500)
    alerts_run(now_ms=now)
    [sent] = mail.outbox
    assert sent.to == ["root@example.com"]
    assert sent.subject.startswith("[LLM quota] shared capacity: 50% of the budget used: ")


def test_cost_budgets_read_in_dollars(world: World, reserve: Any, clock: Any) -> None:
    world.limit(
        tenant=world.tenant,
        feature=world.chat,
        metric="cost_usd",
        window="day",
        amount="0.001",
        enforcement="soft",
    )
    now = clock(at(9))
    use(reserve, 7_000)  # 6,900 x $0.15/M + 100 x $0.60/M = $0.001095
    alerts_run(now_ms=now)
    assert "$0.001095 of $0.001 used (110%)" in mail.outbox[0].body
    assert firing() == [("threshold", 0.5), ("threshold", 0.8), ("threshold", 1.0)]


# -- forecast ----------------------------------------------------------------------------------


def test_forecast_fires_when_the_period_average_runs_out_before_the_reset(
    world: World, budget: Limit, reserve: Any, clock: Any
) -> None:
    clock(at(0, 30))
    use(reserve, 3_000)  # 30% by 06:00: 20:00 at this pace
    alerts_run(now_ms=clock(at(6)))
    [forecast] = Alert.objects.filter(kind="forecast")
    assert abs(forecast.details["runs_out_ms"] - at(20)) < 1000
    assert f"Budget runs out {YEAR}-03-10 20:00 Europe/Berlin" in mail.outbox[0].body


def test_forecast_near_miss_lasts_until_the_reset(
    world: World, budget: Limit, reserve: Any, clock: Any
) -> None:
    clock(at(0, 30))
    use(reserve, 2_400)  # 24% by 06:00: 10,000 exactly at midnight, not before
    alerts_run(now_ms=clock(at(6)))
    assert not Alert.objects.filter(kind="forecast").exists()


def test_forecast_uses_the_ledgers_recent_burn_rate(
    world: World, budget: Limit, reserve: Any, clock: Any
) -> None:
    clock(at(0, 30))
    use(reserve, 3_000)  # 30% by noon: on average it lasts the day
    alerts_run(now_ms=clock(at(12)))
    assert not Alert.objects.filter(kind="forecast").exists()
    noon = datetime.fromtimestamp(at(12) / 1000, UTC)
    for minute in range(1, 31):  # but 2,000 tokens in the last half hour: 4,000 an hour
        UsageRollup.objects.create(
            grain=Grain.MINUTE,
            start=noon - timedelta(minutes=minute),
            tenant="acme",
            feature="chat",
            pool="shared",
            model=world.model.name,
            requests=1,
            input_tokens=50,
            output_tokens=17 if minute % 3 else 16,
        )
    alerts_run(now_ms=clock(at(12, 1)))  # 7,000 left at 2,000 an hour (over the last hour)
    [forecast] = Alert.objects.filter(kind="forecast")
    assert at(15, 30) < forecast.details["runs_out_ms"] < at(15, 32)


def test_a_forecast_is_said_once_per_period(
    world: World, budget: Limit, reserve: Any, clock: Any
) -> None:
    clock(at(0, 30))
    use(reserve, 3_000)
    for hour in (6, 7, 8):
        alerts_run(now_ms=clock(at(hour)))
    assert Alert.objects.filter(kind="forecast").count() == 1
    alerts_run(now_ms=clock(at(0, 1, day=11)))
    assert Alert.objects.get(kind="forecast").state == "resolved"


def test_every_delivery_is_recorded(world: World, daily: Limit, reserve: Any, clock: Any) -> None:
    now = clock(at(9))
    use(reserve, 8_000)
    alerts_run(now_ms=now)
    [delivery] = Delivery.objects.all()
    assert (delivery.kind, delivery.status, delivery.purpose) == ("email", "sent", "alert")
    assert delivery.notification == Notification.objects.get()
    assert delivery.duration_ms is not None and delivery.tenant == world.tenant


def test_with_the_store_down_budget_alerts_stay_and_the_ledgers_rules_still_run(
    world: World, daily: Limit, reserve: Any, clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock(at(9))
    use(reserve, 8_000)
    alerts_run(now_ms=at(9))
    dead = Engine(
        redis_client(DEAD_STORE),
        hash_tag=settings.QUOTA_HASH_TAG,
        partitions=settings.QUOTA_PARTITIONS,
    )
    monkeypatch.setattr(quotas.usage, "get_engine", lambda: dead)  # budgets read through it
    monkeypatch.setattr(alerts.services, "get_engine", lambda: dead)
    UsageRollup.objects.create(
        grain=Grain.MINUTE,
        start=datetime.fromtimestamp(at(9, 25) / 1000, UTC),
        tenant="acme",
        feature="chat",
        requests=100,
        upstream_429=30,
    )
    alerts_run(now_ms=at(9, 30))
    assert firing() == [("threshold", 0.5), ("threshold", 0.8)]  # nothing resolved blindly
    assert firing(kind="upstream_429") == [("upstream_429", 0.3)]
    assert mail.outbox[-1].subject == "[LLM quota] acme/chat: Provider answered 429 to 30% of calls"


def release(world: World, response: Any) -> None:
    rid = response.json()["id"]
    done = world.client().post(f"/api/v1/reservations/{rid}/release", {}, format="json")
    assert done.status_code == 200, done.json()


def test_a_boost_that_ends_brings_the_refusing_alert_back(
    world: World, daily: Limit, reserve: Any, clock: Any
) -> None:
    """Spent (calls refused), boosted (the 80% and 100% resolve, with the numbers of then),
    boost ended: the budget refuses again, and says so again at once."""
    clock(at(9))
    use(reserve, 10_000)
    alerts_run(now_ms=at(9))
    assert firing() == [("threshold", 0.5), ("threshold", 0.8), ("threshold", 1.0)]
    assert Alert.objects.get(level=1.0).refusing
    limit_boost(
        limit=daily,
        amount=Decimal(20_000),
        until=timezone.now() + timedelta(hours=2),
        now=timezone.now(),
    )
    alerts_run(now_ms=clock(at(9, 1)))
    assert firing() == [("threshold", 0.5)]  # 10,000 of 20,000
    resolved = mail.outbox[-1]
    assert resolved.subject == (
        "[LLM quota] acme/chat: Back under 80% and 100%: acme / chat: 10,000 tokens per day"
    )
    # the numbers when it resolved, not those it fired with
    assert "Now: 10,000 tokens of 20,000 tokens used (50%), 10,000 tokens left" in resolved.body
    assert "Resolved: usage is back under the threshold." in resolved.body

    limit_boost_end(limit=daily)
    assert reserve(input_tokens=100).json()["error"] == "budget_exhausted"
    sent = len(mail.outbox)
    alerts_run(now_ms=clock(at(9, 2)))  # same period, same window: fires again, at once
    assert firing() == [("threshold", 0.5), ("threshold", 0.8), ("threshold", 1.0)]
    assert Alert.objects.filter(level=1.0).count() == 2
    [again] = mail.outbox[sent:]
    assert again.subject == (
        "[LLM quota] acme/chat: Calls refused: 100% of the budget used: "
        "acme / chat: 10,000 tokens per day"
    )


def test_a_boost_that_ends_on_its_own_brings_the_alert_back(
    world: World, daily: Limit, reserve: Any, clock: Any
) -> None:
    clock(at(9))
    use(reserve, 10_000)
    alerts_run(now_ms=at(9))
    until = timezone.now() + timedelta(seconds=1)
    limit_boost(limit=daily, amount=Decimal(20_000), until=until, now=timezone.now())
    alerts_run(now_ms=clock(at(9, 1)))
    assert firing() == [("threshold", 0.5)]
    wait_until(lambda: timezone.now() > until, seconds=10, what="the boost to end")
    alerts_run(now_ms=clock(at(9, 2)))  # nobody touched the limit: its boost just ended
    assert firing() == [("threshold", 0.5), ("threshold", 0.8), ("threshold", 1.0)]
    assert "Calls refused: 100% of the budget used" in mail.outbox[-1].subject


def test_a_lowered_limit_fires_the_threshold_again(
    world: World, daily: Limit, reserve: Any, clock: Any
) -> None:
    clock(at(9))
    use(reserve, 8_500)
    alerts_run(now_ms=at(9))
    daily.amount = Decimal(15_000)  # 57%: 80% resolves
    daily.save()
    alerts_run(now_ms=clock(at(9, 1)))
    assert firing() == [("threshold", 0.5)]
    daily.amount = Decimal(10_000)  # 85% again
    daily.save()
    alerts_run(now_ms=clock(at(9, 2)))
    assert firing() == [("threshold", 0.5), ("threshold", 0.8)]
    assert Alert.objects.filter(level=0.8, state="resolved").count() == 1


def test_usage_refunded_then_rising_again_fires_again_but_hovering_does_not(
    world: World, daily: Limit, reserve: Any, clock: Any
) -> None:
    clock(at(9))
    use(reserve, 5_000)
    big = reserve(input_tokens=2_800, max_output_tokens=100, ttl_seconds=3600)  # 7,900
    small = reserve(input_tokens=100, max_output_tokens=100, ttl_seconds=3600)  # 8,100
    alerts_run(now_ms=at(9))
    assert firing() == [("threshold", 0.5), ("threshold", 0.8)]
    release(world, small)  # 79%: hovering at the threshold is still the same crossing
    alerts_run(now_ms=clock(at(9, 1)))
    assert firing() == [("threshold", 0.5), ("threshold", 0.8)]
    release(world, big)  # 50%: refunded, the 80% resolves
    alerts_run(now_ms=clock(at(9, 2)))
    assert firing() == [("threshold", 0.5)]
    use(reserve, 3_500)  # 85%: a second crossing in the same period
    alerts_run(now_ms=clock(at(9, 3)))
    assert firing() == [("threshold", 0.5), ("threshold", 0.8)]
    assert list(Alert.objects.filter(level=0.8).order_by("id").values_list("state", flat=True)) == [
        "resolved",
        "firing",
    ]
