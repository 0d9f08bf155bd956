"""Read-only queries of the ledger's rollups that the alert rules need and the ledger's own
selectors do not offer. Nothing here writes to a ledger table."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db.models import Count, F, Q, QuerySet, Sum

from alerts.state import ms_to_datetime
from ledger.models import DeadLetter, Grain, Refusal, UsageEvent, UsageRollup

# A limit's metric as a sum of rollup columns, in engine units (nano-USD for cost).
_METRIC_EXPRESSIONS: dict[str, Any] = {
    "requests": F("requests"),
    "tokens": F("input_tokens") + F("output_tokens"),
    "input_tokens": F("input_tokens"),
    "output_tokens": F("output_tokens"),
    "cost_usd": F("cost_nusd"),
}


@dataclass(frozen=True)
class Counts:
    """One feature's events over a window, as the rollups count them: `requests` are the
    commits, `expired` and `released` the other ends of a reservation, `refused` the
    reservations refused."""

    requests: int = 0
    refused: int = 0
    truncated: int = 0
    upstream_429: int = 0
    expired: int = 0
    released: int = 0
    would_refuse: int = 0

    @property
    def settled(self) -> int:
        """Reservations that ended in the window, however they ended."""
        return self.requests + self.expired + self.released


def _minute_rows(since: datetime, until: datetime) -> QuerySet[UsageRollup]:
    return UsageRollup.objects.filter(grain=Grain.MINUTE, start__gte=since, start__lt=until)


def scope_usage_since(*, scope: dict[str, str], metric: str, since_ms: int) -> float:
    """Usage of a limit's scope (slugs of tenant, feature, pool, model) since `since_ms`."""
    expression = _METRIC_EXPRESSIONS.get(metric)
    if expression is None:
        return 0.0
    rows = UsageRollup.objects.filter(grain=Grain.MINUTE, start__gte=ms_to_datetime(since_ms))
    rows = rows.filter(**{name: value for name, value in scope.items()})
    total = rows.aggregate(total=Sum(expression))["total"]
    return float(total or 0)


def scope_top_feature(
    *, scope: dict[str, str], metric: str, since_ms: int
) -> tuple[str, str, float] | None:
    """The feature (tenant slug, feature slug, usage) that used most of a limit's scope
    since `since_ms`, or None when none used any."""
    expression = _METRIC_EXPRESSIONS.get(metric)
    if expression is None:
        return None
    rows = UsageRollup.objects.filter(grain=Grain.MINUTE, start__gte=ms_to_datetime(since_ms))
    top = (
        rows.filter(**scope)
        .exclude(feature="")
        .values("tenant", "feature")
        .annotate(used=Sum(expression))
        .order_by("-used", "tenant", "feature")
        .first()
    )
    if top is None or not top["used"]:
        return None
    return top["tenant"], top["feature"], float(top["used"])


def refusals_by_limit(
    *, tenant: str, feature: str, since_ms: int, until_ms: int
) -> dict[int | None, int]:
    """How many of one feature's reservations each limit refused (None: no limit named)."""
    rows = (
        Refusal.objects.filter(
            tenant=tenant, feature=feature, at_ms__gte=since_ms, at_ms__lt=until_ms
        )
        .values("limit_id")
        .annotate(n=Count("id"))
    )
    return {row["limit_id"]: row["n"] for row in rows}


def feature_counts(*, since: datetime, until: datetime) -> dict[tuple[str, str], Counts]:
    """Per (tenant slug, feature slug): what happened in [since, until)."""
    rows = (
        _minute_rows(since, until)
        .values("tenant", "feature")
        .annotate(
            n_requests=Sum("requests"),
            n_refused=Sum(
                F("refused_rate_limited") + F("refused_budget_exhausted") + F("refused_concurrency")
            ),
            n_truncated=Sum("truncated"),
            n_upstream_429=Sum("upstream_429"),
            n_expired=Sum("expired"),
            n_released=Sum("released"),
            n_would_refuse=Sum("would_refuse"),
        )
    )
    return {
        (row["tenant"], row["feature"]): Counts(
            requests=row["n_requests"] or 0,
            refused=row["n_refused"] or 0,
            truncated=row["n_truncated"] or 0,
            upstream_429=row["n_upstream_429"] or 0,
            expired=row["n_expired"] or 0,
            released=row["n_released"] or 0,
            would_refuse=row["n_would_refuse"] or 0,
        )
        for row in rows
    }


def feature_truncation_baseline(
    *, tenant: str, feature: str, since: datetime, until: datetime
) -> Counts:
    """Requests and truncations of one feature over a long stretch, from hourly rollups."""
    rows = UsageRollup.objects.filter(
        grain=Grain.HOUR, start__gte=since, start__lt=until, tenant=tenant, feature=feature
    ).aggregate(requests=Sum("requests"), truncated=Sum("truncated"))
    return Counts(requests=rows["requests"] or 0, truncated=rows["truncated"] or 0)


def would_refuse_limit_ids(
    *, tenant: str, feature: str, since_ms: int, until_ms: int
) -> dict[int, int]:
    """How often each soft or shadow limit would have refused one feature's reservations."""
    # By the moment a reservation ended, as the rollups count it.
    events = UsageEvent.objects.filter(
        Q(finished_ms__gte=since_ms) & Q(finished_ms__lt=until_ms),
        tenant=tenant,
        feature=feature,
    ).exclude(would_refuse="")
    counts: dict[int, int] = {}
    for value in events.values_list("would_refuse", flat=True):
        for part in value.split(","):
            if part.strip().isdigit():
                counts[int(part)] = counts.get(int(part), 0) + 1
    return counts


@dataclass(frozen=True)
class DeadLetters:
    """Dead letters parked after a given one: how many, the last one's id, and the first."""

    count: int = 0
    last_id: int = 0
    first: DeadLetter | None = None


def dead_letters_after(last_id: int) -> DeadLetters:
    parked = DeadLetter.objects.filter(pk__gt=last_id).order_by("pk")
    first = parked.first()
    if first is None:
        return DeadLetters(last_id=last_id)
    newest = parked.last()
    assert newest is not None
    return DeadLetters(count=parked.count(), last_id=newest.pk, first=first)
