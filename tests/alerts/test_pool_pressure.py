"""A pool's owners (the platform's superusers) hear when its breaker opens, when its adaptive
share stays under half for five minutes, and once when the provider states a lower limit."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core import mail

from alerts.models import Alert, RuleKind
from alerts.services import alerts_run
from ledger.services import usage_ingest
from quotas.store import get_engine
from tests.fixtures import World

pytestmark = pytest.mark.django_db
MINUTE = 60_000


@pytest.fixture
def adaptive(world: World) -> World:
    get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    world.pool.backpressure = {"adaptive": True, "breaker_min_calls": 2}
    world.pool.save()
    world.limit(pool=world.pool, metric="tokens", amount=100_000)
    engine = get_engine()
    engine.frozen_ms = engine.now_ms()
    return world


def _call(world: World, reserve: Any, action: str, **body: Any) -> None:
    rid = reserve().json()["id"]
    if action == "commit":
        body.update(input_tokens=10, output_tokens=10)
    answer = world.client().post(f"/api/v1/reservations/{rid}/{action}", body, format="json")
    assert answer.status_code == 200, answer.content


def _later(ms: int) -> None:
    get_engine().frozen_ms = (get_engine().frozen_ms or 0) + ms


def test_a_share_under_half_for_five_minutes_alerts_and_resolves(
    adaptive: World, reserve: Any
) -> None:
    _call(adaptive, reserve, "release", upstream_status=429)  # 0.7
    _later(2000)
    _call(adaptive, reserve, "release", upstream_status=429)  # 0.49
    usage_ingest()

    _later(4 * MINUTE)
    alerts_run()
    assert not Alert.objects.filter(kind=RuleKind.POOL_SHARE).exists()  # not yet five minutes

    _later(MINUTE)
    alerts_run()
    low = Alert.objects.get(kind=RuleKind.POOL_SHARE)
    assert (low.state, low.level, low.tenant) == ("firing", 0.49, None)
    assert mail.outbox[-1].to == ["root@example.com"]
    assert "Pool shared runs at 49% of its configured capacity" in mail.outbox[-1].body

    _later(MINUTE)  # a success recovers 0.75 * 60/300 = 0.15: 0.64
    _call(adaptive, reserve, "commit", upstream_status=200)
    usage_ingest()
    alerts_run()
    low.refresh_from_db()
    assert low.state == "resolved"


def test_an_open_breaker_is_a_critical_alert_until_it_closes(adaptive: World, reserve: Any) -> None:
    _call(adaptive, reserve, "release", upstream_status=502)
    _call(adaptive, reserve, "release", upstream_status=0)
    usage_ingest()

    alerts_run()
    opened = Alert.objects.get(kind=RuleKind.BREAKER_OPEN)
    assert opened.state == "firing"
    assert opened.refusing is True and "severity" not in opened.details
    assert "Critical: the provider is failing on pool shared" in mail.outbox[-1].subject
    assert reserve().status_code == 503

    _later(30_000)  # half-open: the probe succeeds
    _call(adaptive, reserve, "commit", upstream_status=200)
    usage_ingest()
    _later(3_600_000)  # past the storm window
    alerts_run()
    opened.refresh_from_db()
    assert (opened.state, opened.resolve_reason) == ("resolved", "the breaker closed")
    assert reserve().status_code == 201


def test_a_provider_limit_below_the_configured_one_alerts_once(
    adaptive: World, reserve: Any
) -> None:
    headers = {"x-ratelimit-limit-tokens": "30000", "x-ratelimit-remaining-tokens": "29000"}
    for _ in range(3):
        _call(adaptive, reserve, "commit", upstream_status=200, upstream_headers=headers)
    usage_ingest()

    alerts_run()
    alerts_run()

    (alert,) = Alert.objects.filter(kind=RuleKind.PROVIDER_LIMIT)
    assert alert.state == "firing"
    assert len(mail.outbox) == 1
    assert (
        "The provider allows 30000 tokens a minute, pool shared is configured for 100000"
        in mail.outbox[0].body
    )
