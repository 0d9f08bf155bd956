"""From usage to the owner's inbox: storm grouping, two workers evaluating at once, and the
whole road (API reservations, ledger tasks, alert task) with real SMTP and HTTP servers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.conf import settings
from django.core import mail
from django.db import connection
from django.test import override_settings
from pytest_httpserver import HTTPServer

from alerts.models import Alert, AlertRule, Channel, Delivery, Notification
from alerts.selectors import alert_group, unannounced_alerts
from alerts.services import (
    _notification_claim,
    alerts_evaluate,
    alerts_run,
    deliveries_send_pending,
    notifications_dispatch,
)
from alerts.state import Firing, alert_fire, ms_to_datetime
from alerts.tasks import evaluate_alerts
from ledger.tasks import ledger_ingest, ledger_rollups
from quotas.models import Limit
from quotas.store import get_engine
from tests.alerts import test_support as support
from tests.alerts.test_budgets import at
from tests.alerts.test_support import Inbox
from tests.factories import FeatureFactory, TenantFactory, UserFactory
from tests.fixtures import World

smtp_inbox, fast_retries = support.smtp_inbox, support.fast_retries


@pytest.fixture
def daily(world: World) -> Limit:
    AlertRule.objects.create(tenant=world.tenant, kind="forecast", enabled=False)
    return world.limit(
        tenant=world.tenant, feature=world.chat, metric="tokens", window="day", amount=10_000
    )


def use(reserve: Callable[..., Any], tokens: int) -> None:
    response = reserve(input_tokens=tokens - 100, max_output_tokens=100)
    assert response.status_code == 201, response.json()


def test_a_storm_for_one_feature_is_one_message_per_window(
    world: World, daily: Limit, reserve: Any
) -> None:
    daily.enforcement = "soft"  # at 100% it refuses nothing: every alert is a warning
    daily.save()
    engine = get_engine()
    engine.frozen_ms = at(9)
    use(reserve, 6_000)
    alerts_run(now_ms=at(9))  # 50%: said at once
    for minute, tokens in ((2, 2_000), (5, 2_000)):  # 80%, then 100%, in the same window
        engine.frozen_ms = at(9, minute)
        use(reserve, tokens)
        alerts_run(now_ms=at(9, minute))
    assert len(mail.outbox) == 1
    assert Alert.objects.filter(fired_in__isnull=True).count() == 2  # waiting for the window
    alerts_run(now_ms=at(9, 10))
    limit = "acme / chat: 10,000 tokens per day, soft (not enforced)"
    assert [m.subject for m in mail.outbox] == [
        f"[LLM quota] acme/chat: 50% of the budget used: {limit}",
        f"[LLM quota] acme/chat: 100% of the budget used: {limit}",
    ]
    _, second = Notification.objects.order_by("created_at")
    assert [a.level for a in second.fired.order_by("level")] == [0.8, 1.0]


def test_a_hard_limit_refusing_is_sent_at_once_while_warnings_wait_for_the_window(
    world: World, daily: Limit, reserve: Any
) -> None:
    engine = get_engine()
    engine.frozen_ms = at(9)
    use(reserve, 6_000)
    alerts_run(now_ms=at(9))  # 50%: the window's message
    engine.frozen_ms = at(9, 2)
    use(reserve, 2_000)
    alerts_run(now_ms=at(9, 2))  # 80%: a warning, waits for the next window
    assert len(mail.outbox) == 1
    engine.frozen_ms = at(9, 5)
    use(reserve, 2_000)
    alerts_run(now_ms=at(9, 5))  # 100% of a hard limit: calls are refused now
    assert len(mail.outbox) == 2
    urgent = mail.outbox[1]
    assert urgent.subject == (  # one line for the limit: 100% names the 80% with it
        "[LLM quota] acme/chat: Calls refused: 100% of the budget used: "
        "acme / chat: 10,000 tokens per day"
    )
    assert "Calls are being refused (budget_exhausted)" in urgent.body
    notification = Notification.objects.get(urgent=True)
    # the waiting warning rode along: nothing is left for the window
    assert [a.level for a in notification.fired.order_by("level")] == [0.8, 1.0]
    assert not Alert.objects.filter(fired_in__isnull=True).exists()
    # the 50% and 100% of another warning-only window are not sent early by it
    alerts_run(now_ms=at(9, 6))
    assert len(mail.outbox) == 2


def test_storms_of_different_features_do_not_wait_for_each_other(
    world: World, reserve: Any
) -> None:
    for feature in (world.chat, world.batch):
        world.limit(tenant=world.tenant, feature=feature, metric="requests", window="day", amount=2)
    get_engine().frozen_ms = at(9)
    use(reserve, 500)
    reserve(feature="batch", input_tokens=400, max_output_tokens=100)
    alerts_run(now_ms=at(9))
    assert sorted(m.to[0] for m in mail.outbox) == sorted(
        [world.chat.owner.email, world.batch.owner.email]
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(
    settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"),
    reason="SQLite's shared in-memory test database answers 'table is locked' at once instead "
    "of waiting for the other writer; PostgreSQL (CI, production) waits, as a real race does",
)
def test_two_workers_evaluating_at_once_send_one_message(
    world: World, daily: Limit, reserve: Any, httpserver: HTTPServer
) -> None:
    httpserver.expect_request("/slack").respond_with_data("ok")
    Channel.objects.create(
        tenant=world.tenant, name="ops", kind="slack", target=httpserver.url_for("/slack")
    )
    get_engine().frozen_ms = at(9)
    use(reserve, 8_000)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait(timeout=10)
            alerts_run(now_ms=at(9))
        except BaseException as error:
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    assert Alert.objects.count() == 2
    assert Notification.objects.count() == 1
    assert sorted(Delivery.objects.values_list("kind", "status")) == [
        ("email", "sent"),
        ("slack", "sent"),
    ]
    assert len(mail.outbox) == 1
    assert len(httpserver.log) == 1


def test_a_worker_that_read_before_another_claimed_loses_every_claim(
    world: World, daily: Limit, reserve: Any
) -> None:
    """The interleaving the threads above race into, step by step: B read the same unannounced
    alerts as A before A claimed them; B's claims all fail, so B sends nothing."""
    get_engine().frozen_ms = at(9)
    use(reserve, 8_000)
    alerts_evaluate(now_ms=at(9))
    [fired] = [f for f in (_firing(a) for a in Alert.objects.all()) if f.level == 0.8]
    assert alert_fire(firing=fired, now=ms_to_datetime(at(9))) is None  # B fires it again
    seen_by_b = unannounced_alerts()
    assert len(notifications_dispatch(now=ms_to_datetime(at(9)))) == 1  # A
    window = ms_to_datetime(at(9, 10))  # B, even in the next window, finds nothing to claim
    group = alert_group(seen_by_b[0])
    assert (
        _notification_claim(group, seen_by_b, window_start=window, now=window, urgent=False) is None
    )
    assert deliveries_send_pending(now=window) == 1  # A's one e-mail; B has none
    assert deliveries_send_pending(now=window) == 0
    assert len(mail.outbox) == 1


def _firing(alert: Alert) -> Firing:
    return Firing(
        key=alert.key,
        kind=alert.kind,
        subject=alert.subject,
        level=alert.level,
        tenant_id=alert.tenant_id,
        feature_id=alert.feature_id,
        limit_id=alert.limit_id,
    )


def test_evaluating_twice_sends_once(world: World, daily: Limit, reserve: Any) -> None:
    get_engine().frozen_ms = at(9)
    use(reserve, 8_000)
    alerts_run(now_ms=at(9))
    alerts_run(now_ms=at(9))
    alerts_run(now_ms=at(9, 30))
    assert len(mail.outbox) == 1
    assert Delivery.objects.count() == 1


def test_a_delivery_left_pending_by_a_dead_worker_is_sent_by_the_next_run(
    world: World, daily: Limit, reserve: Any
) -> None:
    get_engine().frozen_ms = at(9)
    use(reserve, 8_000)
    dead = override_settings(EMAIL_BACKEND="tests.alerts.test_flow.DeadBackend")
    with dead, pytest.raises(SystemExit):
        alerts_run(now_ms=at(9))
    assert Delivery.objects.get().status == "sending"  # the worker died mid-send
    alerts_run(now_ms=at(9, 1))
    assert mail.outbox == []  # it may still be sending: too early to call it dead
    alerts_run(now_ms=at(9, 16))
    assert len(mail.outbox) == 1
    assert Delivery.objects.get().status == "sent"


class DeadBackend:
    """A mail backend whose worker dies while sending."""

    def __init__(self, **kwargs: Any) -> None:
        pass

    def send_messages(self, messages: list[Any]) -> int:
        raise SystemExit("worker killed")


# -- the whole road ----------------------------------------------------------------------------


def call(world: World, tokens: int, output: int) -> None:
    client = world.client()
    held = client.post(
        "/api/v1/reservations",
        {
            "feature": "chat",
            "model": world.model.name,
            "input_tokens": tokens,
            "max_output_tokens": 500,
        },
        format="json",
    )
    assert held.status_code == 201, held.json()
    done = client.post(
        f"/api/v1/reservations/{held.json()['id']}/commit",
        {"input_tokens": tokens, "output_tokens": output, "finish_reason": "stop"},
        format="json",
    )
    assert done.status_code == 200, done.json()


@pytest.mark.django_db(transaction=True)
@override_settings(LEDGER_INGEST_SECONDS=0.0)
def test_past_80_percent_of_a_daily_budget_the_owner_gets_one_email_and_one_slack_message(
    world: World, httpserver: HTTPServer, smtp_inbox: Inbox
) -> None:
    httpserver.expect_request("/acme-slack").respond_with_data("ok")
    httpserver.expect_request("/bravo-slack").respond_with_data("ok")
    world.limit(
        tenant=world.tenant, feature=world.chat, metric="tokens", window="day", amount=10_000
    )
    Channel.objects.create(
        tenant=world.tenant, name="acme-ops", kind="slack", target=httpserver.url_for("/acme-slack")
    )
    world.tenant.owners.add(UserFactory(username="cto@acme.example"))  # of every acme feature
    bravo = TenantFactory(slug="bravo")
    bravo.owners.add(UserFactory(username="boss@bravo.example"))
    FeatureFactory(tenant=bravo, slug="report", owner=UserFactory(username="bo@bravo.example"))
    world.limit(tenant=bravo, metric="tokens", window="day", amount=10)
    Channel.objects.create(
        tenant=bravo, name="bravo-ops", kind="slack", target=httpserver.url_for("/bravo-slack")
    )
    engine = get_engine()
    engine.frozen_ms = engine.now_ms()  # one moment: no period may end during the test

    for _ in range(5):
        call(world, tokens=1_500, output=200)  # 1,700 a call: 8,500 of 10,000
    assert ledger_ingest() == 10  # five reservations, five commits
    ledger_rollups()
    evaluate_alerts()
    evaluate_alerts()  # the next beat: nothing new

    owner = world.chat.owner.email
    # the feature's owner and its tenant's, in one e-mail; not bravo's
    assert [m.recipients for m in smtp_inbox.received] == [[owner, "cto@acme.example"]]
    [email] = smtp_inbox.received
    assert "80% of the budget used" in email.part("text/plain")
    assert email.subject.startswith("[LLM quota] acme/chat: ")  # 50%, 80% (and a forecast?)
    [(request, _)] = httpserver.log
    assert request.path == "/acme-slack"
    slack_text = str(request.get_json()["blocks"])
    assert "80% of the budget used" in slack_text and "8,500 tokens of 10,000" in slack_text
    assert "/admin/quotas/limit/" in slack_text  # the button to the limit's admin page
    assert sorted(Delivery.objects.values_list("kind", "status")) == [
        ("email", "sent"),
        ("slack", "sent"),
    ]
