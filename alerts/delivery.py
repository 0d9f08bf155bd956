"""Sending one delivery through its transport, recording how it went, and disabling a
channel whose target is gone for good (and telling its owners by e-mail)."""

from __future__ import annotations

import time
from datetime import datetime
from urllib.parse import urlsplit

from django.utils import timezone

from alerts.conf import alerts_setting
from alerts.messages import channel_disabled_message
from alerts.metrics import DELIVERIES
from alerts.models import Channel, Delivery
from alerts.selectors import Route, owner_addresses
from alerts.transports import Message, RetryPolicy, Transport, TransportError, transport_class
from tenants.models import Tenant


def retry_policy() -> RetryPolicy:
    return RetryPolicy(
        attempts=int(alerts_setting("ALERTS_RETRY_ATTEMPTS")),
        backoff_seconds=float(alerts_setting("ALERTS_RETRY_BACKOFF_SECONDS")),
        max_wait_seconds=float(alerts_setting("ALERTS_RETRY_MAX_WAIT_SECONDS")),
        timeout_seconds=float(alerts_setting("ALERTS_HTTP_TIMEOUT_SECONDS")),
    )


def delivery_create(
    *,
    route: Route,
    tenant: Tenant | None,
    now: datetime,
    notification_id: int | None = None,
    purpose: str = "alert",
) -> Delivery:
    # A Slack hook's or webhook's URL is a credential: the row keeps only its host.
    shown = route.target if route.kind == "email" else urlsplit(route.target).netloc
    return Delivery.objects.create(
        notification_id=notification_id,
        channel=route.channel,
        tenant=tenant,
        kind=route.kind,
        target=shown[:500],
        purpose=purpose,
        created_at=now,
    )


def delivery_send(*, delivery_id: int, message: Message) -> Delivery | None:
    """Sends a pending delivery once: the pending -> sending update is the claim, so two
    workers never send the same row. None when another worker had it."""
    claimed = Delivery.objects.filter(pk=delivery_id, status=Delivery.Status.PENDING).update(
        status=Delivery.Status.SENDING
    )
    if not claimed:
        return None
    delivery = Delivery.objects.select_related("channel").get(pk=delivery_id)
    started = time.monotonic()
    try:
        delivery.attempts = _transport(delivery).notify(message)
        delivery.status = Delivery.Status.SENT
    except TransportError as error:
        delivery.status = Delivery.Status.FAILED
        delivery.error = str(error)[:2000]
        delivery.permanent = error.permanent
        delivery.attempts = error.attempts
    delivery.duration_ms = round((time.monotonic() - started) * 1000)
    delivery.finished_at = timezone.now()
    delivery.save(
        update_fields=["status", "error", "permanent", "attempts", "duration_ms", "finished_at"]
    )
    DELIVERIES.labels(delivery.kind, _outcome(delivery)).inc()
    if delivery.permanent and delivery.channel_id is not None:
        channel_disable(channel_id=delivery.channel_id, reason=delivery.error)
    return delivery


def _outcome(delivery: Delivery) -> str:
    if delivery.status == Delivery.Status.SENT:
        return "sent"
    return "failed_permanent" if delivery.permanent else "failed"


def _transport(delivery: Delivery) -> Transport:
    channel = delivery.channel
    url_kind = delivery.kind != "email"
    target = channel.target if (url_kind and channel is not None) else delivery.target
    return transport_class(delivery.kind)(
        target=target, secret=channel.secret if channel else "", retry=retry_policy()
    )


def channel_disable(*, channel_id: int, reason: str) -> bool:
    """Disables the channel once (a conditional update) and e-mails its owners about it."""
    now = timezone.now()
    disabled = Channel.objects.filter(pk=channel_id, enabled=True).update(
        enabled=False, disabled_reason=reason, disabled_at=now
    )
    if not disabled:
        return False
    channel = Channel.objects.select_related("tenant", "feature__owner").get(pk=channel_id)
    owners = owner_addresses(tenant=channel.tenant, feature=channel.feature)
    if owners:
        route = Route("email", ",".join(owners))
        delivery = delivery_create(
            route=route, tenant=channel.tenant, now=now, purpose="channel_disabled"
        )
        delivery_send(
            delivery_id=delivery.pk, message=channel_disabled_message(channel=channel, error=reason)
        )
    return True
