"""Rollups per minute, hour and day (UTC) for tenant, feature, pool and model, and the
retention of raw rows and of each grain.

A reservation counts in the minute it was made (as it counts in the budget period it was
made in), so a row never moves between buckets when it settles, even long after. A run looks
at the rows ingested since the previous run (less a margin, for transactions that committed
late and clocks that differ between workers), recomputes every minute those rows belong to
from the raw rows, then the hours and days those minutes belong to from the
grain below. Recomputing whole buckets makes a run idempotent, and a late commit simply
recomputes its minute. Refusals have no pool: their rollups carry an empty one.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from django.db import transaction
from django.db.models import BigIntegerField, Count, ExpressionWrapper, F, Q, Sum, Value

from ledger.conf import ledger_setting
from ledger.models import Grain, LedgerState, Refusal, UsageEvent, UsageRollup

MINUTE_MS, HOUR_MS, DAY_MS = 60_000, 3_600_000, 86_400_000
DIMENSIONS = ("tenant", "feature", "pool", "model")
REFUSAL_COLUMN = {
    "rate_limited": "refused_rate_limited",
    "budget_exhausted": "refused_budget_exhausted",
    "concurrency": "refused_concurrency",
}
COUNTERS = (
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "cost_nusd",
    *REFUSAL_COLUMN.values(),
    "truncated",
    "upstream_429",
    "expired",
    "released",
    "would_refuse",
)
HISTOGRAM_BASE = 1.1  # wait buckets 10% wide: percentiles survive merging into hours and days
Key = tuple[int, str, str, str, str]  # bucket start (ms) and the dimensions
Bucket = dict[str, Any]


def _minute_of(field: str) -> ExpressionWrapper:
    return ExpressionWrapper(F(field) / Value(MINUTE_MS), output_field=BigIntegerField())


def rollups_update(*, now_ms: int | None = None) -> int:
    """Recompute the buckets touched since the last run; returns how many minutes."""
    now_ms = now_ms or int(time.time() * 1000)
    state, _ = LedgerState.objects.get_or_create(pk=1)
    since = (state.rollup_watermark_ms or 0) - ledger_setting("LEDGER_ROLLUP_MARGIN_SECONDS") * 1000
    minutes = _touched_minutes(since)
    with transaction.atomic():
        _replace(Grain.MINUTE, minutes, _minute_buckets(minutes))
        hours = sorted({m // HOUR_MS * HOUR_MS for m in minutes})
        _replace(Grain.HOUR, hours, _merged(Grain.MINUTE, hours, HOUR_MS))
        days = sorted({h // DAY_MS * DAY_MS for h in hours})
        _replace(Grain.DAY, days, _merged(Grain.HOUR, days, DAY_MS))
        LedgerState.objects.filter(pk=1).update(rollup_watermark_ms=now_ms)
    return len(minutes)


def _touched_minutes(since_ms: int) -> list[int]:
    usage = (
        UsageEvent.objects.filter(ingested_ms__gte=since_ms, created_ms__isnull=False)
        .exclude(state="held")
        .annotate(minute=_minute_of("created_ms"))
        .values_list("minute", flat=True)
        .distinct()
    )
    refusals = (
        Refusal.objects.filter(ingested_ms__gte=since_ms)
        .annotate(minute=_minute_of("at_ms"))
        .values_list("minute", flat=True)
        .distinct()
    )
    return sorted({m * MINUTE_MS for m in [*usage, *refusals]})


def _runs(starts: list[int], width: int) -> Iterable[tuple[int, int]]:
    """Contiguous ranges [start, stop) covering the bucket starts, to query by range."""
    run_start = prev = None
    for start in starts:
        if run_start is None or prev is None or start != prev + width:
            if run_start is not None and prev is not None:
                yield run_start, prev + width
            run_start = start
        prev = start
    if run_start is not None and prev is not None:
        yield run_start, prev + width


def _empty() -> Bucket:
    return {**dict.fromkeys(COUNTERS, 0), "hist": defaultdict(int)}


def _minute_buckets(minutes: list[int]) -> dict[Key, Bucket]:
    buckets: dict[Key, Bucket] = defaultdict(_empty)
    for start, stop in _runs(minutes, MINUTE_MS):
        _add_usage(buckets, start, stop)
        _add_waits(buckets, start, stop)
        _add_refusals(buckets, start, stop)
    return buckets


def _add_usage(buckets: dict[Key, Bucket], start: int, stop: int) -> None:
    committed = Q(state="committed")
    rows = (
        UsageEvent.objects.filter(created_ms__gte=start, created_ms__lt=stop)
        .exclude(state="held")
        .annotate(minute=_minute_of("created_ms"))
        .values("minute", *DIMENSIONS)
        .annotate(
            requests=Count("id", filter=committed),
            input_tokens=Sum("input_tokens", filter=committed),
            cached_input_tokens=Sum("cached_input_tokens", filter=committed),
            output_tokens=Sum("output_tokens", filter=committed),
            cost_nusd=Sum("cost_nusd", filter=committed),
            truncated=Count("id", filter=committed & Q(finish_reason="length")),
            upstream_429=Count("id", filter=Q(upstream_status=429)),
            expired=Count("id", filter=Q(state="expired")),
            released=Count("id", filter=Q(state="released")),
            would_refuse=Count("id", filter=~Q(would_refuse="")),
        )
    )
    for row in rows:
        bucket = buckets[(row["minute"] * MINUTE_MS, *(row[d] for d in DIMENSIONS))]
        for name in COUNTERS:
            bucket[name] += row.get(name) or 0


def _add_waits(buckets: dict[Key, Bucket], start: int, stop: int) -> None:
    rows = (
        UsageEvent.objects.filter(created_ms__gte=start, created_ms__lt=stop, wait_ms__isnull=False)
        .exclude(state="held")
        .values_list("created_ms", *DIMENSIONS, "wait_ms")
    )
    for created, tenant, feature, pool, model, wait in rows:
        key = (created // MINUTE_MS * MINUTE_MS, tenant, feature, pool, model)
        buckets[key]["hist"][_histogram_index(wait)] += 1


def _add_refusals(buckets: dict[Key, Bucket], start: int, stop: int) -> None:
    rows = (
        Refusal.objects.filter(at_ms__gte=start, at_ms__lt=stop)
        .annotate(minute=_minute_of("at_ms"))
        .values_list("minute", "tenant", "feature", "model", "reason")
        .annotate(n=Count("id"))
    )
    for minute, tenant, feature, model, reason, n in rows:
        column = REFUSAL_COLUMN.get(reason)
        if column:
            buckets[(minute * MINUTE_MS, tenant, feature, "", model)][column] += n


def _merged(grain: str, starts: list[int], width: int) -> dict[Key, Bucket]:
    """Buckets of `width` summed from the finer grain below (histograms merged)."""
    buckets: dict[Key, Bucket] = defaultdict(_empty)
    for start, stop in _runs(starts, width):
        rows = UsageRollup.objects.filter(
            grain=grain, start__gte=_datetime(start), start__lt=_datetime(stop)
        ).values("start", *DIMENSIONS, *COUNTERS, "wait_histogram")
        for row in rows:
            ms = int(row["start"].timestamp() * 1000) // width * width
            bucket = buckets[(ms, *(row[d] for d in DIMENSIONS))]
            for name in COUNTERS:
                bucket[name] += row[name]
            for index, n in row["wait_histogram"].items():
                bucket["hist"][int(index)] += n
    return buckets


def _replace(grain: str, starts: list[int], buckets: dict[Key, Bucket]) -> None:
    for start, stop in _runs(starts, {"minute": MINUTE_MS, "hour": HOUR_MS}.get(grain, DAY_MS)):
        UsageRollup.objects.filter(
            grain=grain, start__gte=_datetime(start), start__lt=_datetime(stop)
        ).delete()
    UsageRollup.objects.bulk_create(
        [_rollup(grain, key, bucket) for key, bucket in buckets.items()], batch_size=1000
    )


def _rollup(grain: str, key: Key, bucket: Bucket) -> UsageRollup:
    hist = dict(bucket["hist"])
    return UsageRollup(
        grain=grain,
        start=_datetime(key[0]),
        **dict(zip(DIMENSIONS, key[1:], strict=True)),
        **{name: bucket[name] for name in COUNTERS},
        wait_p50_ms=_percentile(hist, 0.50),
        wait_p95_ms=_percentile(hist, 0.95),
        wait_histogram={str(i): n for i, n in sorted(hist.items())},
    )


def _datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _histogram_index(wait_ms: int) -> int:
    return 0 if wait_ms <= 0 else 1 + int(math.log(wait_ms) / math.log(HISTOGRAM_BASE))


def _percentile(hist: dict[int, int], q: float) -> int | None:
    """The upper edge of the bucket holding the q-quantile (at most 10% above the truth)."""
    total = sum(hist.values())
    if not total:
        return None
    seen = 0
    for index in sorted(hist):
        seen += hist[index]
        if seen >= q * total:
            return 0 if index == 0 else math.ceil(HISTOGRAM_BASE**index)
    return None


def ledger_prune(*, now_ms: int | None = None) -> dict[str, int]:
    """Delete what is older than its retention. Raw usage is kept at least 35 days: a month
    budget is rebuilt from it."""
    now_ms = now_ms or int(time.time() * 1000)

    def cutoff(name: str, floor_days: int = 0) -> int:
        return now_ms - max(ledger_setting(name), floor_days) * DAY_MS

    deleted = {
        "usage": UsageEvent.objects.filter(
            Q(finished_ms__lt=cutoff("LEDGER_RAW_RETENTION_DAYS", 35))
            | Q(finished_ms__isnull=True, created_ms__lt=cutoff("LEDGER_RAW_RETENTION_DAYS", 35))
        ).delete()[0],
        "refusals": Refusal.objects.filter(
            at_ms__lt=cutoff("LEDGER_REFUSAL_RETENTION_DAYS")
        ).delete()[0],
    }
    for grain in Grain.values:
        setting = f"LEDGER_{grain.upper()}_RETENTION_DAYS"
        old = UsageRollup.objects.filter(grain=grain, start__lt=_datetime(cutoff(setting)))
        deleted[grain] = old.delete()[0]
    return deleted
