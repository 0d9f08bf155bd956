"""Reads of the ledger for commands, the admin and the alert rules."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from django.db.models import BigIntegerField, Count, ExpressionWrapper, F, Sum, Value

from ledger.conf import ledger_setting
from ledger.models import ProviderUsage, UsageEvent

DAY_MS = 86_400_000
METRICS = ("requests", "input_tokens", "cached_input_tokens", "output_tokens", "cost_nusd")


@dataclass(frozen=True)
class ProviderDrift:
    """One metric of one model on one day: the provider's figure against the ledger's."""

    pool: str
    day: date
    model: str
    metric: str
    ledger: int
    provider: int
    alert: bool

    @property
    def difference(self) -> int:
        return self.provider - self.ledger

    @property
    def ratio(self) -> float:
        largest = max(abs(self.ledger), abs(self.provider))
        return self.difference / largest if largest else 0.0


def provider_drift_floor(metric: str) -> int:
    """Below this absolute difference a drift is noise (calls in flight over midnight)."""
    if metric == "cost_nusd":
        return int(Decimal(str(ledger_setting("LEDGER_PROVIDER_DRIFT_MIN_USD"))) * 10**9)
    if metric == "requests":
        return int(ledger_setting("LEDGER_PROVIDER_DRIFT_MIN_REQUESTS"))
    return int(ledger_setting("LEDGER_PROVIDER_DRIFT_MIN_TOKENS"))


def provider_drift_alerts(*, metric: str, ledger: int, provider: int) -> bool:
    """The alert rule: the difference is above the ratio of the larger figure, and above the
    metric's floor."""
    ratio = float(ledger_setting("LEDGER_PROVIDER_DRIFT_RATIO"))
    difference = abs(provider - ledger)
    return difference > ratio * max(abs(ledger), abs(provider)) and (
        difference >= provider_drift_floor(metric)
    )


def _day_ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)


def ledger_daily_usage(*, pool: str, first: date, last: date) -> dict[tuple[date, str], dict]:
    """Committed usage of a pool per UTC day (of the reservation) and model."""
    day = ExpressionWrapper(F("created_ms") / Value(DAY_MS), output_field=BigIntegerField())
    rows = (
        UsageEvent.objects.filter(
            pool=pool,
            state="committed",
            created_ms__gte=_day_ms(first),
            created_ms__lt=_day_ms(last + timedelta(days=1)),
        )
        .annotate(day=day)
        .values("day", "model")
        .annotate(
            requests=Count("id"),
            input_tokens=Sum("input_tokens"),
            cached_input_tokens=Sum("cached_input_tokens"),
            output_tokens=Sum("output_tokens"),
            cost_nusd=Sum("cost_nusd"),
        )
    )
    epoch = date(1970, 1, 1)
    return {
        (epoch + timedelta(days=row["day"]), row["model"]): {m: row[m] or 0 for m in METRICS}
        for row in rows
    }


def provider_drift(
    *, pool: str, since: date | None = None, until: date | None = None
) -> list[ProviderDrift]:
    """Every metric the provider reported, per day and model, for the days it reported."""
    imported = ProviderUsage.objects.filter(pool=pool)
    if since:
        imported = imported.filter(day__gte=since)
    if until:
        imported = imported.filter(day__lte=until)
    provider = {(row.day, row.model): row for row in imported}
    if not provider:
        return []
    days = {day for day, _ in provider}
    ledger = ledger_daily_usage(pool=pool, first=min(days), last=max(days))
    models: dict[date, set[str]] = defaultdict(set)
    for day, model in [*provider, *(k for k in ledger if k[0] in days)]:
        models[day].add(model)
    rows = []
    for day in sorted(models):
        for model in sorted(models[day]):
            reported = provider.get((day, model))
            ours = ledger.get((day, model), dict.fromkeys(METRICS, 0))
            for metric in METRICS:
                theirs = getattr(reported, metric) if reported else 0
                if theirs is None:
                    continue  # not in the export (Anthropic reports no request counts)
                alert = provider_drift_alerts(metric=metric, ledger=ours[metric], provider=theirs)
                rows.append(ProviderDrift(pool, day, model, metric, ours[metric], theirs, alert))
    return rows
