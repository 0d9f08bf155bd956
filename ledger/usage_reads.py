"""Reads of the usage rollups for the admin's pages: one feature's last 24 hours and 30 days,
a pool's top consumers, and the features whose truncation share rose.

Buckets are UTC, as the rollups are. The last 24 hours are the 24 hourly buckets ending with
the current (partial) hour; the last 30 days the 30 daily buckets ending with the current day.

Which rows to sum: the rollups write one row per grain, bucket, tenant, feature, pool and
model, and never a row that totals others (no "all pools" or "all models" rows). Usage rows
carry the pool the reservation ran on; refusals have no pool, so their rows carry `pool = ""`.
So a feature's figures are the sum of all its rows, whatever their pool and model (refusals
included, nothing counted twice), and a pool's figures are its own rows only (refusals, which
belong to no pool, are left out).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import Exists, F, OuterRef, Q, Sum, Window
from django.db.models.functions import RowNumber

from ledger.models import Grain, UsageRollup
from ledger.rollups import COUNTERS, REFUSAL_COLUMN
from quotas.plan.infos import NANO

# Sums per bucket (the rollups' counters); cost is summed in nano-USD and given in USD.
REFUSAL_REASONS = REFUSAL_COLUMN
HOURS, DAYS = 24, 30


def hour_floor(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def day_floor(moment: datetime) -> datetime:
    return hour_floor(moment).replace(hour=0)


def _bucket(start: datetime | None, sums: dict[str, Any]) -> dict[str, Any]:
    """A bucket (or a total, with start None) in the shape the pages show."""
    n = {name: int(sums.get(name) or 0) for name in COUNTERS}
    bucket: dict[str, Any] = {} if start is None else {"start": start}
    bucket.update(
        requests=n["requests"],
        input_tokens=n["input_tokens"],
        cached_input_tokens=n["cached_input_tokens"],
        output_tokens=n["output_tokens"],
        tokens=n["input_tokens"] + n["output_tokens"],
        cost_nusd=n["cost_nusd"],
        cost_usd=Decimal(n["cost_nusd"]) / NANO,
        refusals={reason: n[column] for reason, column in REFUSAL_REASONS.items()},
        refused=sum(n[column] for column in REFUSAL_REASONS.values()),
        truncated=n["truncated"],
        upstream_429=n["upstream_429"],
        expired=n["expired"],
        released=n["released"],
    )
    return bucket


def _series(
    *, tenant: str, feature: str, grain: str, first: datetime, step: timedelta, count: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows = (
        UsageRollup.objects.filter(
            tenant=tenant,
            feature=feature,
            grain=grain,
            start__gte=first,
            start__lt=first + step * count,
        )
        .values("start")
        .annotate(**{name: Sum(name) for name in COUNTERS})
    )
    found = {row["start"].astimezone(UTC): row for row in rows}
    starts = [first + step * i for i in range(count)]
    buckets = [_bucket(start, found.get(start, {})) for start in starts]
    totals = {name: sum(int(row[name] or 0) for row in found.values()) for name in COUNTERS}
    return buckets, _bucket(None, totals)


def feature_series(*, tenant: str, feature: str, now: datetime) -> dict[str, Any]:
    """One feature's usage (all its pools and models, refusals included): 24 hourly buckets
    and 30 daily ones, oldest first, missing buckets as zeros, and the totals of each.

    A bucket: start, requests, input/cached/output tokens, tokens (input + output),
    cost_nusd, cost_usd (Decimal), refusals by reason (rate_limited, budget_exhausted,
    concurrency), refused (their sum), truncated, upstream_429, expired, released."""
    hour, day = timedelta(hours=1), timedelta(days=1)
    windows = (
        ("hourly", "totals_24h", Grain.HOUR, hour_floor(now) - hour * (HOURS - 1), hour, HOURS),
        ("daily", "totals_30d", Grain.DAY, day_floor(now) - day * (DAYS - 1), day, DAYS),
    )
    series: dict[str, Any] = {}
    for name, totals, grain, first, step, count in windows:
        series[name], series[totals] = _series(
            tenant=tenant, feature=feature, grain=grain, first=first, step=step, count=count
        )
    return series


def _last_24h(now: datetime) -> tuple[datetime, datetime]:
    until = hour_floor(now) + timedelta(hours=1)
    return until - timedelta(hours=HOURS), until


def top_consumers(
    *, pool: str, now: datetime, limit: int = 5, tenant_slugs: list[str] | None = None
) -> list[dict[str, Any]]:
    """The features that used the most tokens (input + output) of one pool over the last
    24 hours, most first: tenant, feature, requests, input_tokens, output_tokens, tokens,
    cost_nusd, cost_usd. `tenant_slugs` narrows them to those tenants (None: every tenant)."""
    return _top(now=now, limit=limit, tenant_slugs=tenant_slugs, pool=pool).get(pool, [])


def top_consumers_by_pool(
    *, now: datetime, limit: int = 5, tenant_slugs: list[str] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """`top_consumers` of every pool with usage, in one query: by pool slug."""
    return _top(now=now, limit=limit, tenant_slugs=tenant_slugs, pool=None)


def _top(
    *, now: datetime, limit: int, tenant_slugs: list[str] | None, pool: str | None
) -> dict[str, list[dict[str, Any]]]:
    since, until = _last_24h(now)
    rows = UsageRollup.objects.filter(grain=Grain.HOUR, start__gte=since, start__lt=until)
    rows = rows.exclude(pool="") if pool is None else rows.filter(pool=pool)
    if tenant_slugs is not None:
        rows = rows.filter(tenant__in=tenant_slugs)
    ranked = (
        rows.values("pool", "tenant", "feature")
        .annotate(
            n_requests=Sum("requests"),
            n_input=Sum("input_tokens"),
            n_output=Sum("output_tokens"),
            n_cost=Sum("cost_nusd"),
            n_tokens=Sum(F("input_tokens") + F("output_tokens")),
        )
        .filter(n_tokens__gt=0)
        .annotate(
            rank=Window(
                RowNumber(),
                partition_by=[F("pool")],
                order_by=[F("n_tokens").desc(), F("tenant").asc(), F("feature").asc()],
            )
        )
        .filter(rank__lte=limit)
        .order_by("pool", "rank")
    )
    by_pool: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in ranked:
        by_pool[row["pool"]].append(
            {
                "tenant": row["tenant"],
                "feature": row["feature"],
                "requests": row["n_requests"],
                "input_tokens": row["n_input"],
                "output_tokens": row["n_output"],
                "tokens": row["n_tokens"],
                "cost_nusd": row["n_cost"],
                "cost_usd": Decimal(row["n_cost"]) / NANO,
            }
        )
    return dict(by_pool)


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def rising_truncation(
    *,
    now: datetime,
    tenant_slugs: list[str] | None,
    limit: int = 10,
    min_requests: int = 100,
    min_rise: float = 0.01,
) -> list[dict[str, Any]]:
    """Features whose share of truncated commits (finish_reason=length) rose: over the last
    24 hours at least `min_requests` commits, and a share at least `min_rise` (0.01: one
    percentage point) above the share of the 24 hours before (0 when it had no commits).
    Largest rise first: tenant, feature, requests, truncated, share, previous_requests,
    previous_truncated, previous_share, rise. `tenant_slugs` None: every tenant.

    Only a feature with a truncation in the last 24 hours can have risen: a partial index
    holds those rows, and only those features' rows are summed (index-only, see the model)."""
    since, until = _last_24h(now)
    previous = since - timedelta(hours=HOURS)
    hours = UsageRollup.objects.filter(grain=Grain.HOUR)
    if tenant_slugs is not None:
        hours = hours.filter(tenant__in=tenant_slugs)
    truncating = hours.filter(
        truncated__gt=0,
        start__gte=since,
        start__lt=until,
        tenant=OuterRef("tenant"),
        feature=OuterRef("feature"),
    )
    now_window = Q(start__gte=since)
    sums = (
        hours.filter(Exists(truncating), start__gte=previous, start__lt=until)
        .values("tenant", "feature")
        .annotate(
            n_requests=Sum("requests", filter=now_window),
            n_truncated=Sum("truncated", filter=now_window),
            p_requests=Sum("requests", filter=~now_window),
            p_truncated=Sum("truncated", filter=~now_window),
        )
    )
    risen = []
    for row in sums:
        requests, truncated = row["n_requests"] or 0, row["n_truncated"] or 0
        p_requests, p_truncated = row["p_requests"] or 0, row["p_truncated"] or 0
        share, p_share = _share(truncated, requests), _share(p_truncated, p_requests)
        if requests < min_requests or round(share - p_share, 9) < min_rise:
            continue
        risen.append(
            {
                "tenant": row["tenant"],
                "feature": row["feature"],
                "requests": requests,
                "truncated": truncated,
                "share": share,
                "previous_requests": p_requests,
                "previous_truncated": p_truncated,
                "previous_share": p_share,
                "rise": share - p_share,
            }
        )
    risen.sort(key=lambda r: (-r["rise"], r["tenant"], r["feature"]))
    return risen[:limit]
