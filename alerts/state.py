"""Firing and resolving alerts, each a claim that only one evaluation can win.

Two workers evaluating at the same moment both see a threshold crossed; both try to insert
the alert, the unique key lets one row in, and only that worker's alert is ever announced.
Resolving is a conditional UPDATE (`state = firing`), so it too happens once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.db import IntegrityError, transaction

from alerts.models import Alert


@dataclass(frozen=True)
class Firing:
    key: str
    kind: str
    subject: str
    level: float
    tenant_id: int | None = None
    feature_id: int | None = None
    limit_id: int | None = None
    period_start: datetime | None = None
    period_end: datetime | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # calls are being refused now: the alert, and its resolve, go out at once
    refusing: bool = False


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def alert_fire(*, firing: Firing, now: datetime) -> Alert | None:
    """The new alert, or None when this alert (same key) was fired before or by another
    worker just now, or the same subject is still firing."""
    try:
        with transaction.atomic():
            return Alert.objects.create(
                key=firing.key,
                kind=firing.kind,
                subject=firing.subject,
                level=firing.level,
                refusing=firing.refusing,
                tenant_id=firing.tenant_id,
                feature_id=firing.feature_id,
                limit_id=firing.limit_id,
                period_start=firing.period_start,
                period_end=firing.period_end,
                details=firing.details,
                fired_at=now,
            )
    except IntegrityError:
        return None


def alert_resolve(
    *, alert_id: int, now: datetime, reason: str, details: dict[str, Any] | None = None
) -> bool:
    """Whether this call resolved the alert (False: it was resolved already)."""
    values: dict[str, Any] = {
        "state": Alert.State.RESOLVED,
        "resolved_at": now,
        "resolve_reason": reason,
    }
    if details is not None:
        values["details"] = details
    updated = Alert.objects.filter(pk=alert_id, state=Alert.State.FIRING).update(**values)
    return updated == 1
