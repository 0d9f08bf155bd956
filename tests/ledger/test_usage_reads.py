"""The admin's reads of the usage rollups (ledger.usage_reads), on hand-made rollup rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from ledger.models import UsageRollup
from ledger.usage_reads import (
    feature_series,
    rising_truncation,
    top_consumers,
    top_consumers_by_pool,
)

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 28, 14, 30, 15, tzinfo=UTC)
HOUR = datetime(2026, 11, 28, 14, tzinfo=UTC)  # the current hour's bucket
TODAY = datetime(2026, 11, 28, tzinfo=UTC)
H, D = timedelta(hours=1), timedelta(days=1)


def row(grain: str, start: datetime, tenant: str, feature: str, **fields: Any) -> None:
    fields.setdefault("pool", "shared")
    fields.setdefault("model", "small")
    UsageRollup.objects.create(grain=grain, start=start, tenant=tenant, feature=feature, **fields)


def zeros(series: list[dict[str, Any]], *except_starts: datetime) -> bool:
    return all(
        b["requests"] == b["tokens"] == b["refused"] == b["truncated"] == 0 and b["cost_usd"] == 0
        for b in series
        if b["start"] not in except_starts
    )


def test_feature_series_sums_every_pool_and_model_and_fills_missing_buckets() -> None:
    usage = {"requests": 3, "input_tokens": 300, "output_tokens": 60, "cost_nusd": 1_500_000}
    row("hour", HOUR, "acme", "chat", truncated=1, upstream_429=1, cached_input_tokens=50, **usage)
    row("hour", HOUR, "acme", "chat", model="large", requests=1, input_tokens=100,
        output_tokens=40, cost_nusd=500_000, expired=2, released=1)  # fmt: skip
    # Refusals have no pool: their own row, counted once beside the usage rows.
    row("hour", HOUR, "acme", "chat", pool="", refused_rate_limited=2, refused_budget_exhausted=1)
    row("hour", HOUR - 2 * H, "acme", "chat", requests=2, input_tokens=200, output_tokens=20)
    row("hour", HOUR - 23 * H, "acme", "chat", requests=7, input_tokens=700, output_tokens=70)
    row("hour", HOUR - 24 * H, "acme", "chat", requests=100)  # before the 24 hours
    row("hour", HOUR, "acme", "batch", requests=50)  # another feature
    row("hour", HOUR, "globex", "chat", requests=60)  # the same slug in another tenant
    row("minute", HOUR + timedelta(minutes=5), "acme", "chat", requests=3)  # another grain
    row("day", TODAY, "acme", "chat", requests=10, input_tokens=1000, cost_nusd=2_000_000_000)
    row("day", TODAY - 29 * D, "acme", "chat", pool="", refused_concurrency=4)
    row("day", TODAY - 29 * D, "acme", "chat", requests=5)
    row("day", TODAY - 30 * D, "acme", "chat", requests=1000)  # before the 30 days

    series = feature_series(tenant="acme", feature="chat", now=NOW)

    hourly, daily = series["hourly"], series["daily"]
    assert [b["start"] for b in hourly] == [HOUR - (23 - i) * H for i in range(24)]
    assert [b["start"] for b in daily] == [TODAY - (29 - i) * D for i in range(30)]
    assert hourly[-1] == {
        "start": HOUR,
        "requests": 4,
        "input_tokens": 400,
        "cached_input_tokens": 50,
        "output_tokens": 100,
        "tokens": 500,
        "cost_nusd": 2_000_000,
        "cost_usd": Decimal("0.002"),
        "refusals": {"rate_limited": 2, "budget_exhausted": 1, "concurrency": 0},
        "refused": 3,
        "truncated": 1,
        "upstream_429": 1,
        "expired": 2,
        "released": 1,
    }
    assert (hourly[-3]["requests"], hourly[-3]["tokens"]) == (2, 220)
    assert (hourly[0]["requests"], hourly[0]["tokens"]) == (7, 770)
    assert zeros(hourly, HOUR, HOUR - 2 * H, HOUR - 23 * H)
    totals = series["totals_24h"]
    assert (totals["requests"], totals["tokens"], totals["refused"]) == (13, 1490, 3)
    assert totals["cost_usd"] == Decimal("0.002") and "start" not in totals

    assert (daily[-1]["requests"], daily[-1]["cost_usd"]) == (10, Decimal(2))
    assert daily[0]["requests"] == 5
    assert daily[0]["refusals"] == {"rate_limited": 0, "budget_exhausted": 0, "concurrency": 4}
    assert zeros(daily, TODAY, TODAY - 29 * D)
    assert (series["totals_30d"]["requests"], series["totals_30d"]["refused"]) == (15, 4)


def test_feature_series_of_a_feature_without_rows_is_all_zeros() -> None:
    series = feature_series(tenant="acme", feature="nothing", now=NOW)
    assert (len(series["hourly"]), len(series["daily"])) == (24, 30)
    assert zeros(series["hourly"]) and zeros(series["daily"])
    assert series["totals_30d"]["refusals"] == {
        "rate_limited": 0,
        "budget_exhausted": 0,
        "concurrency": 0,
    }


def test_top_consumers_of_a_pool_by_tokens_over_the_last_24_hours() -> None:
    row("hour", HOUR, "acme", "chat", requests=2, input_tokens=500, output_tokens=100,
        cost_nusd=900)  # fmt: skip
    row("hour", HOUR - 23 * H, "acme", "chat", model="large", requests=1, input_tokens=300,
        output_tokens=100, cost_nusd=100)  # fmt: skip
    row("hour", HOUR, "acme", "batch", requests=1, input_tokens=900, output_tokens=0)
    row("hour", HOUR, "globex", "chat", requests=1, input_tokens=700, output_tokens=200)
    row("hour", HOUR, "globex", "tiny", requests=1, input_tokens=10, output_tokens=0)
    row("hour", HOUR, "globex", "refused", pool="", refused_rate_limited=9)  # refusals: no pool
    row("hour", HOUR, "globex", "other-pool", pool="dedicated", input_tokens=10**6)
    row("hour", HOUR - 24 * H, "globex", "old", input_tokens=10**6)  # before the 24 hours
    row("minute", HOUR, "globex", "minutes", input_tokens=10**6)  # another grain
    row("day", TODAY, "globex", "days", input_tokens=10**6)

    top = top_consumers(pool="shared", now=NOW, limit=3)

    assert [(t["tenant"], t["feature"], t["tokens"]) for t in top] == [
        ("acme", "chat", 1000),
        ("acme", "batch", 900),  # ties: by tenant, then feature
        ("globex", "chat", 900),
    ]
    assert top[0] == {
        "tenant": "acme",
        "feature": "chat",
        "requests": 3,
        "input_tokens": 800,
        "output_tokens": 200,
        "tokens": 1000,
        "cost_nusd": 1000,
        "cost_usd": Decimal("0.000001"),
    }
    scoped = top_consumers(pool="shared", now=NOW, tenant_slugs=["globex"])
    assert [(t["feature"], t["tokens"]) for t in scoped] == [("chat", 900), ("tiny", 10)]
    assert top_consumers(pool="dedicated", now=NOW, tenant_slugs=["acme"]) == []


def window(tenant: str, feature: str, now: tuple[int, int], before: tuple[int, int]) -> None:
    """Hourly rows of (requests, truncated) in the last 24 hours and the 24 before, each split
    over two hours and two models (the truncations all in one row)."""
    for (requests, truncated), start in ((now, HOUR - 5 * H), (before, HOUR - 30 * H)):
        if requests:
            half = requests // 2
            row("hour", start, tenant, feature, requests=half, truncated=truncated)
            row("hour", start - H, tenant, feature, model="large", requests=requests - half)


def test_rising_truncation_compares_the_last_24_hours_with_the_24_before() -> None:
    window("acme", "chat", now=(200, 20), before=(200, 4))  # 2% -> 10%
    window("acme", "batch", now=(200, 4), before=(100, 2))  # 2% -> 2%
    window("acme", "edge", now=(100, 3), before=(100, 2))  # 2% -> 3%: exactly one point
    window("acme", "quiet", now=(300, 0), before=(300, 30))  # fell
    window("globex", "chat", now=(150, 3), before=(0, 0))  # nothing before: from 0%
    window("globex", "small", now=(50, 25), before=(50, 0))  # too few commits to judge
    row("hour", HOUR - 60 * H, "acme", "batch", requests=10, truncated=10)  # too old to count
    row("minute", HOUR, "acme", "batch", requests=10, truncated=10)  # another grain

    risen = rising_truncation(now=NOW, tenant_slugs=None)

    assert [(r["tenant"], r["feature"]) for r in risen] == [
        ("acme", "chat"),
        ("globex", "chat"),
        ("acme", "edge"),
    ]
    assert risen[0] == {
        "tenant": "acme",
        "feature": "chat",
        "requests": 200,
        "truncated": 20,
        "share": 0.1,
        "previous_requests": 200,
        "previous_truncated": 4,
        "previous_share": 0.02,
        "rise": pytest.approx(0.08),
    }
    assert (risen[1]["previous_requests"], risen[1]["previous_share"]) == (0, 0.0)
    assert risen[1]["rise"] == pytest.approx(0.02)

    assert [r["feature"] for r in rising_truncation(now=NOW, tenant_slugs=["globex"])] == ["chat"]
    assert rising_truncation(now=NOW, tenant_slugs=[]) == []
    assert [r["feature"] for r in rising_truncation(now=NOW, tenant_slugs=None, limit=1)] == [
        "chat"
    ]
    stricter = rising_truncation(now=NOW, tenant_slugs=None, min_requests=160, min_rise=0.05)
    assert [(r["tenant"], r["feature"]) for r in stricter] == [("acme", "chat")]


def test_top_consumers_of_every_pool_in_one_read() -> None:
    for pool, feature, tokens in (
        ("shared", "chat", 500),
        ("shared", "batch", 900),
        ("shared", "small", 10),
        ("dedicated", "report", 700),
    ):
        row("hour", HOUR, "acme", feature, pool=pool, requests=1, input_tokens=tokens)
    row("hour", HOUR, "acme", "refused", pool="", refused_rate_limited=9)

    by_pool = top_consumers_by_pool(now=NOW, limit=2)

    assert {pool: [t["feature"] for t in top] for pool, top in by_pool.items()} == {
        "shared": ["batch", "chat"],
        "dedicated": ["report"],
    }
    assert by_pool["shared"] == top_consumers(pool="shared", now=NOW, limit=2)
    assert top_consumers_by_pool(now=NOW, tenant_slugs=["globex"]) == {}
