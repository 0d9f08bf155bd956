"""The platform hears when the ledger parks usage events it could not store (dead letters):
one alert per new batch of them, not one per event. The alert fires when dead letters appear
after those the last such alert covered, takes in any that follow while it is firing, and
resolves at the first evaluation that finds none new; the next batch fires a new one."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from alerts.ledger_reads import DeadLetters, dead_letters_after
from alerts.models import Alert, RuleKind
from alerts.state import Firing, alert_fire, alert_resolve

SUBJECT = "ledger:dead_letters"


def dead_letters_evaluate(*, now: datetime) -> None:
    latest = Alert.objects.filter(kind=RuleKind.DEAD_LETTERS).order_by("-fired_at", "-id").first()
    seen = int(latest.details.get("last_id", 0)) if latest is not None else 0
    new = dead_letters_after(seen)
    firing = latest if latest is not None and latest.state == Alert.State.FIRING else None
    if new.count == 0:
        if firing is not None:
            alert_resolve(alert_id=firing.id, now=now, reason="no new dead letters")
        return
    if firing is not None:  # said once already: it only covers more now
        count = int(firing.details.get("count", 0)) + new.count
        details = {**firing.details, "count": count, "last_id": new.last_id}
        Alert.objects.filter(pk=firing.pk).update(details=details, level=float(count))
        return
    firing_new = Firing(
        key=f"dead_letters:{new.last_id}",
        kind=RuleKind.DEAD_LETTERS,
        subject=SUBJECT,
        level=float(new.count),
        details=_details(new),
    )
    alert_fire(firing=firing_new, now=now)


def _details(new: DeadLetters) -> dict[str, Any]:
    assert new.first is not None
    return {
        "count": new.count,
        "last_id": new.last_id,
        "first_entry": new.first.entry_id,
        "first_error": new.first.error[:300],
    }
