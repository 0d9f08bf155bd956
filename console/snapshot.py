"""The platform-wide panels of a superuser's dashboard, computed in the background.

Ranking every limit of the platform by the share used means reading all of them from Redis
(30,000 limits take about a second of work), and a pool's top consumers aggregate every
feature's hourly rollups: too much for each page view. Celery beat recomputes them every
minute into one Redis key; the dashboard shows the top consumers and rising truncation from
it, and re-reads the candidate limits live, so the numbers on the bars are current. An owner's
dashboard covers only their tenants and is computed on each view.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from ledger.usage_reads import NANO, rising_truncation, top_consumers_by_pool
from quotas.plan import plans
from quotas.store import get_engine, get_redis
from quotas.usage import limits_read

CANDIDATES = 50  # limits kept as candidates for "closest to exhaustion"
STALE_AFTER_SECONDS = 300  # older than this (beat not running?), a page recomputes it
KEY_SUFFIX = "console:platform"


def snapshot_key() -> str:
    return get_engine().keys.prefix + KEY_SUFFIX


def platform_snapshot_refresh(*, now: datetime) -> dict[str, Any]:
    """Recompute and store the snapshot; returns it."""
    plan = plans.fresh()
    infos = [info for info in plan.limits.values() if info.amount is not None]
    rows = limits_read(plan, infos)
    ranked = sorted(rows, key=lambda r: -(r["used"] / r["limit"] if r["limit"] else 0.0))
    snapshot = {
        "computed_at": now.timestamp(),
        "closest_ids": [row["id"] for row in ranked[:CANDIDATES]],
        "top_by_pool": {
            pool: [_storable(row) for row in rows]
            for pool, rows in top_consumers_by_pool(now=now).items()
        },
        "truncation": rising_truncation(now=now, tenant_slugs=None),
    }
    get_redis().set(snapshot_key(), json.dumps(snapshot), ex=STALE_AFTER_SECONDS * 2)
    return _loaded(snapshot)


def platform_snapshot(*, now: datetime) -> dict[str, Any]:
    """The stored snapshot, or a fresh one when there is none or it is too old."""
    raw = get_redis().get(snapshot_key())
    if raw is not None:
        snapshot = json.loads(raw)
        if now.timestamp() - snapshot["computed_at"] < STALE_AFTER_SECONDS:
            return _loaded(snapshot)
    return platform_snapshot_refresh(now=now)


def _storable(row: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in row.items() if not isinstance(value, Decimal)}


def _loaded(snapshot: dict[str, Any]) -> dict[str, Any]:
    """Costs back in USD, as `ledger.usage_reads` gives them, and the time as a datetime."""
    for rows in snapshot["top_by_pool"].values():
        for row in rows:
            row["cost_usd"] = Decimal(row["cost_nusd"]) / NANO
    snapshot["as_of"] = datetime.fromtimestamp(snapshot["computed_at"], tz=UTC)
    return snapshot
