"""Alert services: evaluate the rules, group what changed into messages, deliver them; and
the writes behind the admin's and the config file's channels.

Evaluation and dispatch are safe to run twice, or in two workers at the same moment: every
step is a claim (a unique key, a conditional UPDATE) that only one of them wins.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from django.db import IntegrityError, transaction
from django.utils import timezone

from alerts.budgets import budgets_read, forecasts_evaluate, thresholds_evaluate
from alerts.conf import alerts_setting
from alerts.dead_letters import dead_letters_evaluate
from alerts.delivery import delivery_create, delivery_send
from alerts.health import health_evaluate
from alerts.messages import notification_message, test_message
from alerts.models import Alert, Channel, Delivery, Notification
from alerts.pool_pressure import pool_pressure_evaluate
from alerts.rules import RuleBook
from alerts.selectors import (
    Route,
    alert_group,
    owner_addresses,
    routes_for,
    unannounced_alerts,
)
from alerts.state import ms_to_datetime
from alerts.transports import Message
from quotas.store import get_engine
from tenants.models import Feature, Tenant
from tenants.services import Upserted, model_upsert

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunReport:
    notifications: int
    deliveries: int


def alerts_run(*, now_ms: int | None = None) -> RunReport:
    """One beat: evaluate every rule, then send what changed."""
    if now_ms is None:
        now_ms = _clock_ms()
    now = ms_to_datetime(now_ms)
    alerts_evaluate(now_ms=now_ms)
    notifications = notifications_dispatch(now=now)
    sent = deliveries_send_pending(now=now)
    return RunReport(notifications=len(notifications), deliveries=sent)


def _clock_ms() -> int:
    """Redis's clock, the one budgets reset by; this node's while the store is down."""
    try:
        return get_engine().now_ms()
    except redis.RedisError:
        return int(time.time() * 1000)


def alerts_evaluate(*, now_ms: int) -> None:
    now = ms_to_datetime(now_ms)
    rules = RuleBook.load()
    try:
        readings = budgets_read(now_ms=now_ms)
    except redis.RedisError:
        # Without the counters nothing can be said about budgets, and nothing resolved: an
        # empty reading would resolve every threshold. The ledger's rules still run.
        log.warning("alerts: the quota store is unavailable; budget rules skipped", exc_info=True)
    else:
        thresholds_evaluate(readings=readings, rules=rules, now=now)
        forecasts_evaluate(readings=readings, rules=rules, now=now)
    health_evaluate(rules=rules, now=now)
    dead_letters_evaluate(now=now)
    pool_pressure_evaluate(rules=rules, now=now)


def notifications_dispatch(*, now: datetime) -> list[Notification]:
    """One message per group for everything not yet announced. Warnings wait when the group
    already had its message in this storm window; an alert that means calls are being
    refused now (and its resolve) goes at once in a message of its own, taking along what
    else of its group was waiting."""
    groups: dict[str, list[Alert]] = defaultdict(list)
    for alert in unannounced_alerts():
        groups[alert_group(alert)].append(alert)
    window = timedelta(seconds=int(alerts_setting("ALERTS_STORM_WINDOW_SECONDS")))
    window_start = _window_start(now, window)
    sent = []
    for group, alerts in groups.items():
        urgent = any(alert.refusing for alert in alerts)
        starts = now if urgent else window_start
        notification = _notification_claim(
            group, alerts, window_start=starts, now=now, urgent=urgent
        )
        if notification is not None:
            sent.append(notification)
    return sent


def _window_start(now: datetime, window: timedelta) -> datetime:
    seconds = int(window.total_seconds()) or 1
    return ms_to_datetime(int(now.timestamp()) // seconds * seconds * 1000)


@transaction.atomic
def _notification_claim(
    group: str, alerts: list[Alert], *, window_start: datetime, now: datetime, urgent: bool
) -> Notification | None:
    """The group's message with the alerts it claimed, or None when the group had its
    message in this window (warnings only) or another worker claimed every alert."""
    first = alerts[0]
    try:
        with transaction.atomic():
            notification = Notification.objects.create(
                group=group,
                window_start=window_start,
                tenant=first.tenant,
                feature=first.feature,
                urgent=urgent,
                created_at=now,
            )
    except IntegrityError:
        return None
    fired, resolved = _alerts_claim(notification, [a.pk for a in alerts])
    if not fired and not resolved:
        transaction.set_rollback(True)
        return None
    _notification_compose(notification, fired, resolved, now=now)
    return notification


def _alerts_claim(notification: Notification, ids: list[int]) -> tuple[list[Alert], list[Alert]]:
    """Conditional updates: an alert another worker announced meanwhile is not taken."""
    pending = Alert.objects.filter(pk__in=ids)
    pending.filter(fired_in__isnull=True).update(fired_in=notification)
    pending.filter(state=Alert.State.RESOLVED, resolved_in__isnull=True).update(
        resolved_in=notification
    )
    related = ("tenant", "feature__tenant", "feature__owner", "limit")
    fired = notification.fired.select_related(*related).order_by("fired_at", "id")
    resolved = notification.resolved.select_related(*related).order_by("fired_at", "id")
    return list(fired), list(resolved)


def _notification_compose(
    notification: Notification, fired: list[Alert], resolved: list[Alert], *, now: datetime
) -> None:
    """Renders the message once (kept, so a delivery can be sent again) and queues one
    delivery per route."""
    message = notification_message(notification=notification, fired=fired, resolved=resolved)
    notification.subject = message.subject[:300]
    notification.message = asdict(message)
    notification.save(update_fields=["subject", "message"])
    for route in routes_for(tenant=notification.tenant, feature=notification.feature):
        delivery_create(
            route=route, tenant=notification.tenant, now=now, notification_id=notification.pk
        )


def deliveries_send_pending(*, now: datetime) -> int:
    """Sends every pending delivery of a notification, each claimed so it is sent once.

    A delivery still "sending" long after it was created belonged to a worker that died:
    it goes back to pending and is sent again. The message may then arrive twice; losing
    it is worse."""
    stuck = now - timedelta(seconds=int(alerts_setting("ALERTS_STUCK_DELIVERY_SECONDS")))
    Delivery.objects.filter(
        status=Delivery.Status.SENDING, created_at__lt=stuck, notification__isnull=False
    ).update(status=Delivery.Status.PENDING)
    pending = Delivery.objects.filter(
        status=Delivery.Status.PENDING, notification__isnull=False
    ).select_related("notification")
    sent = 0
    for delivery in list(pending.order_by("id")):
        assert delivery.notification is not None
        message = Message(**delivery.notification.message)
        if delivery_send(delivery_id=delivery.pk, message=message) is not None:
            sent += 1
    return sent


def channel_test(*, channel_id: int) -> Delivery:
    """Sends a test message through the channel now and returns how it went."""
    channel = Channel.objects.select_related("tenant", "feature__owner").get(pk=channel_id)
    now = timezone.now()
    target = channel.target
    if channel.kind == "email" and not target:
        target = ",".join(owner_addresses(tenant=channel.tenant, feature=channel.feature))
    route = Route(channel.kind, target, channel)
    delivery = delivery_create(route=route, tenant=channel.tenant, now=now, purpose="test")
    delivery_send(delivery_id=delivery.pk, message=test_message(channel=channel, now=now))
    delivery.refresh_from_db()
    return delivery


def channel_enable(*, channel_id: int) -> None:
    Channel.objects.filter(pk=channel_id).update(enabled=True, disabled_reason="", disabled_at=None)


REDACTED = "REDACTED"


def channel_target_redacted(kind: str, target: str) -> str:
    """The target as it may be shown outside the database. A Slack webhook URL's path after
    `/services/` holds the token that lets anyone post: it becomes REDACTED (the whole path of
    a URL without `/services/`), and any query, fragment or user info goes. Another webhook's
    URL keeps its path; its user info and every query value (where such URLs carry tokens)
    become REDACTED."""
    if kind == "email" or not target:
        return target
    url = urlsplit(target)
    host = url.netloc.rpartition("@")[2]
    if kind != "slack":
        user = f"{REDACTED}@" if "@" in url.netloc else ""
        query = urlencode([(name, REDACTED) for name, _ in parse_qsl(url.query, True)])
        return urlunsplit((url.scheme, user + host, url.path, query, ""))
    head, services, _ = url.path.partition("/services/")
    path = f"{head}{services}{REDACTED}" if services else f"/{REDACTED}"
    return urlunsplit((url.scheme, host, path, "", ""))


def channel_upsert(
    *,
    tenant: Tenant | None,
    name: str,
    kind: str,
    target: str = "",
    feature: Feature | None = None,
    secret: str | None = None,
) -> Upserted[Channel]:
    """Create or update the tenant's channel of this name. A webhook keeps its signing key
    unless one is given, so re-applying a file never rotates it. A channel disabled after a
    permanent failure stays disabled until its target changes (or someone enables it)."""
    values: dict[str, Any] = {"kind": kind, "target": target, "feature": feature}
    if secret:
        values["secret"] = secret
    stored = Channel.objects.filter(tenant=tenant, name=name).first()
    if stored is not None and stored.target != target:
        values.update(enabled=True, disabled_reason="", disabled_at=None)
    return model_upsert(Channel, lookup={"tenant": tenant, "name": name}, values=values)
