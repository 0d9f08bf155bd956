"""What the console's pages show: each limit's live state (read from the engine), the
reservations held now, usage from the ledger's rollups, and the dashboard's panels.

Every function takes a row the admin already scoped to the user (a feature, a tenant, a
pool) or the user, and shows nothing the user does not own: a pool's page and the dashboard
narrow the limits, reservations and usage to the user's tenants and features
(`console.scoping.reach`) unless the user is a superuser.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from django.db.models import F, Prefetch
from django.urls import reverse
from django.utils import timezone

from alerts.models import Alert, Delivery
from alerts.selectors import latest_alerts
from console.access import may_use_admin
from console.scoping import Reach, reach, scope_queryset
from console.snapshot import platform_snapshot
from ledger.models import PoolEvent
from ledger.usage_reads import (
    feature_series,
    rising_truncation,
    top_consumers,
    top_consumers_by_pool,
)
from providers.models import Pool
from quotas.engine.types import Held
from quotas.models import Limit
from quotas.plan import LimitInfo, Plan, plans
from quotas.store import get_engine
from quotas.usage import limits_read
from tenants.models import Feature, Tenant

log = logging.getLogger(__name__)

STORE_DOWN = "The quota store (Redis) is unavailable: live state cannot be shown right now."
CLOSEST_SHOWN = 10
ALERTS_SHOWN = 10
HELD_SHOWN = 20

# A bar's colour by how much of the limit is used.
TONES = ((0.9, "full"), (0.7, "warn"), (-math.inf, "ok"))


@dataclass
class Live:
    """Limits as the engine sees them now; `error` instead when the store is down."""

    limits: list[dict[str, Any]] = field(default_factory=list)
    held: Held | None = None
    error: str = ""


def tone(fraction: float) -> str:
    return next(name for floor, name in TONES if fraction >= floor)


def _read(plan: Plan, infos: list[LimitInfo], *, now: datetime) -> list[dict[str, Any]]:
    """`limits_read` plus what a page needs beside it: the share used, the bar's tone, a
    running boost, and where to edit the limit."""
    rows = limits_read(plan, infos)
    boosted = Limit.objects.filter(
        id__in=[row["id"] for row in rows], boost_until__gt=now, boost_amount__gt=F("amount")
    )
    boosts = dict(boosted.values_list("id", "boost_until"))
    for row, info in zip(rows, infos, strict=True):
        fraction = row["used"] / row["limit"] if row["limit"] else 0.0
        row["fraction"] = fraction
        row["percent"] = min(100.0, round(fraction * 100, 1))
        # A guarantee alone (no amount) is a share kept for the feature, not a cap: using all
        # of it is what it is for, so it is drawn in its own colour and offers no boost.
        row["guarantee"] = info.amount is None and info.guaranteed is not None
        row["tone"] = "guarantee" if row["guarantee"] else tone(fraction)
        row["boosted_until"] = boosts.get(info.id)
        row["tenant_id"] = info.tenant_id
        row["feature_id"] = info.feature_id
    return rows


def _live(
    plan: Plan,
    infos: list[LimitInfo],
    *,
    now: datetime,
    held: dict[str, Any] | None,
    user: Any = None,
) -> Live:
    try:
        limits = _read(plan, infos, now=now)
        found = get_engine().held(show=HELD_SHOWN, **held) if held is not None else None
    except redis.RedisError:
        log.warning("live state unavailable", exc_info=True)
        return Live(error=STORE_DOWN)
    if found is not None:
        for lease in found.leases:
            lease["expires_in"] = max(0, (int(lease["expires_ms"]) - found.now_ms) // 1000)
            _line_wait(lease, found.now_ms)
    if user is not None:
        _boost_links(limits, user)
    return Live(limits=limits, held=found)


def _line_wait(lease: dict[str, Any], now_ms: int) -> None:
    """A scheduled reservation still in line: when it starts, and the wait it was promised."""
    start = lease.get("start_ms")
    if start is not None and int(start) > now_ms:
        lease["starts_in"] = -(-(int(start) - now_ms) // 1000)
        lease["promised_wait"] = -(-(int(start) - int(lease["created_ms"])) // 1000)


def _boost_links(rows: list[dict[str, Any]], user: Any) -> None:
    """A boost link on each limit the user may change: an owner changes their tenants'
    limits, a pool's own capacity is the platform's."""
    if not user.has_perm("quotas.change_limit"):
        return
    scope = reach(user)
    for row in rows:
        if row["guarantee"]:
            continue
        if scope.covers(tenant_id=row["tenant_id"], feature_id=row["feature_id"]):
            row["boost_url"] = reverse("admin:quotas_limit_boost", args=[row["id"]])


def feature_context(feature: Feature, user: Any, *, now: datetime | None = None) -> dict[str, Any]:
    """A feature's page: its limits (every limit a reservation of it is checked against, as
    the API's usage endpoint shows them), its held reservations, and its usage."""
    now = now or timezone.now()
    plan = plans.fresh()
    info = plan.features.get((feature.tenant_id, feature.slug))
    infos = plan.feature_limits(info) if info else []
    held = {"tenant_id": feature.tenant_id, "feature_id": feature.pk}
    live = _live(plan, infos, now=now, held=held, user=user)
    usage = feature_series(tenant=feature.tenant.slug, feature=feature.slug, now=now)
    totals = [("Last 24 hours", usage["totals_24h"]), ("Last 30 days", usage["totals_30d"])]
    return {"live": live, "usage_totals": totals, "chart": _chart(usage)}


def tenant_context(tenant: Tenant, user: Any, *, now: datetime | None = None) -> dict[str, Any]:
    """A tenant's page: its features, every limit of the tenant (its own and its
    features') and the reservations held for it."""
    now = now or timezone.now()
    plan = plans.fresh()
    infos = sorted(plan.by_tenant.get(tenant.pk, []), key=lambda i: (i.feature_id or 0, i.id))
    return {
        "live": _live(plan, infos, now=now, held={"tenant_id": tenant.pk}, user=user),
        "features": tenant.features.select_related("tenant", "owner").order_by("slug"),
    }


def pool_context(pool: Pool, user: Any, *, now: datetime | None = None) -> dict[str, Any]:
    """A pool's page: its limits (the pool's own for superusers, with every tenant's limits
    on it; an owner sees only their tenants' limits on it), held reservations (superusers),
    and the pool's top consumers over the last 24 hours."""
    now = now or timezone.now()
    plan = plans.fresh()
    scope = reach(user)
    infos = [
        info for info in plan.limits.values() if info.pool_id == pool.pk and _covers(scope, info)
    ]
    infos.sort(key=lambda i: (i.tenant_id or 0, i.feature_id or 0, i.id))
    held = {"pool": pool.slug} if scope.tenant_ids is None else None
    top = _visible(
        plan, scope, top_consumers(pool=pool.slug, now=now, tenant_slugs=_slugs(plan, scope))
    )
    return {
        "live": _live(plan, infos, now=now, held=held, user=user),
        "top": _linked(plan, top),
        "pressure": pool_pressure(pool, now=now),
    }


def dashboard_context(user: Any, *, now: datetime | None = None) -> dict[str, Any]:
    """The admin index: the limits closest to exhaustion, the top consumers per pool, the
    recent alerts with their deliveries, and the features whose truncation rose. A
    superuser's platform-wide panels come from the snapshot beat refreshes every minute
    (`console.snapshot`), the candidate limits re-read live; an owner's are read live."""
    if not may_use_admin(user):
        return {}
    now = now or timezone.now()
    plan = plans.fresh()
    context: dict[str, Any] = {"dashboard": True, "alerts": _recent_alerts(user)}
    scope = reach(user)
    try:
        if scope.tenant_ids is None:
            snapshot = platform_snapshot(now=now)
            infos = [plan.limits[i] for i in snapshot["closest_ids"] if i in plan.limits]
            top_by_pool, truncation = snapshot["top_by_pool"], snapshot["truncation"]
            context["as_of"] = snapshot["as_of"]
        else:
            infos = [
                info
                for info in plan.limits.values()
                if info.amount is not None and info.tenant_id is not None and _covers(scope, info)
            ]
            slugs = _slugs(plan, scope)
            top_by_pool = {
                pool: _visible(plan, scope, rows)
                for pool, rows in top_consumers_by_pool(now=now, tenant_slugs=slugs).items()
            }
            truncation = _visible(plan, scope, rising_truncation(now=now, tenant_slugs=slugs))
    except redis.RedisError:
        log.warning("dashboard unavailable", exc_info=True)
        return {**context, "live": Live(error=STORE_DOWN)}
    live = _live(plan, infos, now=now, held=None)
    live.limits = sorted(live.limits, key=lambda row: -row["fraction"])[:CLOSEST_SHOWN]
    for row in live.limits:
        row["url"] = _limit_url(row)
    pools = Pool.objects.order_by("position", "slug").values_list("slug", flat=True)
    return {
        **context,
        "live": live,
        "top_by_pool": [(pool, _linked(plan, top_by_pool.get(pool, []))) for pool in pools],
        "truncation": _linked(plan, truncation),
    }


def _covers(scope: Reach, info: LimitInfo) -> bool:
    return scope.covers(tenant_id=info.tenant_id, feature_id=info.feature_id)


def _slugs(plan: Plan, scope: Reach) -> list[str] | None:
    """The slugs of the tenants whose usage the user may see some of; None for all."""
    if scope.feature_ids is None:
        return None
    tenant_ids = {info.tenant_id for info in plan.features.values() if info.id in scope.feature_ids}
    return sorted(t.slug for t in plan.tenants.values() if t.id in tenant_ids)


def _visible(plan: Plan, scope: Reach, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The usage rows (named by tenant and feature slugs) of features the user reaches."""
    if scope.feature_ids is None:
        return rows
    tenant_ids = {t.slug: t.id for t in plan.tenants.values()}
    visible = []
    for row in rows:
        info = plan.features.get((tenant_ids.get(row["tenant"], 0), row["feature"]))
        if info is not None and info.id in scope.feature_ids:
            visible.append(row)
    return visible


def _limit_url(row: dict[str, Any]) -> str:
    """Where a limit is seen and edited: its feature's page, else its tenant's, else its own."""
    if row["feature_id"]:
        return reverse("admin:tenants_feature_change", args=[row["feature_id"]])
    if row["tenant_id"]:
        return reverse("admin:tenants_tenant_change", args=[row["tenant_id"]])
    return reverse("admin:quotas_limit_change", args=[row["id"]])


def _linked(plan: Plan, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows naming a feature by its slugs, with the URL of its admin page (when it exists)."""
    tenant_ids = {t.slug: t.id for t in plan.tenants.values()}
    for row in rows:
        info = plan.features.get((tenant_ids.get(row["tenant"], 0), row["feature"]))
        row["url"] = reverse("admin:tenants_feature_change", args=[info.id]) if info else ""
    return rows


def _recent_alerts(user: Any) -> list[Alert]:
    deliveries = Prefetch("fired_in__deliveries", queryset=Delivery.objects.order_by("created_at"))
    alerts = latest_alerts(scope_queryset(user, Alert.objects.all()))
    return list(
        alerts.select_related("tenant", "feature", "fired_in")
        .prefetch_related(deliveries)
        .order_by("-fired_at")[:ALERTS_SHOWN]
    )


def _chart(usage: dict[str, Any]) -> dict[str, Any]:
    """The usage series as Chart.js takes them: labels and one list per dataset."""

    def series(buckets: list[dict[str, Any]], label: str) -> dict[str, Any]:
        return {
            "labels": [b["start"].astimezone(UTC).strftime(label) for b in buckets],
            "input_tokens": [b["input_tokens"] for b in buckets],
            "output_tokens": [b["output_tokens"] for b in buckets],
            "refused": [b["refused"] for b in buckets],
            "truncated": [b["truncated"] for b in buckets],
            "upstream_429": [b["upstream_429"] for b in buckets],
            "cost_usd": [float(b["cost_usd"]) for b in buckets],
        }

    return {"hourly": series(usage["hourly"], "%H:00"), "daily": series(usage["daily"], "%m-%d")}


# -- a pool following its provider ---------------------------------------------------------

PRESSURE_HOURS = 6
CHART_WIDTH, CHART_HEIGHT = 600, 80


def pool_pressure(pool: Pool, *, now: datetime) -> dict[str, Any]:
    """A pool's adaptive share and breaker now, and over the last hours from the ledger's
    pool events: a step chart of the share (SVG points) with the spans the breaker was
    open, and the events themselves, latest first."""
    try:
        state = get_engine().pressure_state(pool.pk)
    except redis.RedisError:
        state = None
    # the events carry the engine's time (Redis's), which the state was read with
    now_ms = int(state["now_ms"]) if state else int(now.timestamp() * 1000)
    since_ms = now_ms - PRESSURE_HOURS * 3_600_000
    events = list(
        PoolEvent.objects.filter(pool=pool.slug, at_ms__gte=since_ms).order_by("at_ms", "id")
    )
    return {
        "now": _pressure_now(state),
        "chart": _share_chart(events, since_ms, now_ms),
        "events": [
            {"at": e.at, "kind": e.get_kind_display(), "share": e.share, "detail": e.detail}
            for e in reversed(events[-50:])
        ],
        "hours": PRESSURE_HOURS,
    }


def _pressure_now(state: dict[str, float] | None) -> dict[str, Any] | None:
    if state is None:
        return None
    open_until, now_ms = state["open_until_ms"], state["now_ms"]
    if open_until == 0:
        breaker = "closed"
    elif open_until > now_ms:
        breaker = f"open for {math.ceil((open_until - now_ms) / 1000)} s more"
    else:
        breaker = "half-open (one probe a second)"
    return {"share_percent": round(state["share"] * 100), "breaker": breaker}


def _share_chart(events: list[PoolEvent], since_ms: int, now_ms: int) -> dict[str, Any]:
    """The share as a step line from `since_ms` to now, and the breaker's open spans, in
    the chart's own coordinates (x: time, y: share 0..1 upwards)."""
    span = max(1, now_ms - since_ms)

    def x(ms: int) -> float:
        return round((ms - since_ms) * CHART_WIDTH / span, 1)

    def y(share: float) -> float:
        return round((1 - share) * CHART_HEIGHT, 1)

    share, points, open_at, spans = 1.0, [(0.0, y(1.0))], None, []
    adapted = [e for e in events if e.kind == PoolEvent.Kind.ADAPTED and e.share is not None]
    if adapted and adapted[0].detail.get("was"):
        share = float(adapted[0].detail["was"])
        points = [(0.0, y(share))]
    for event in events:
        if event.kind == PoolEvent.Kind.ADAPTED and event.share is not None:
            points += [(x(event.at_ms), y(share)), (x(event.at_ms), y(event.share))]
            share = event.share
        elif event.kind == PoolEvent.Kind.BREAKER_OPENED and open_at is None:
            open_at = event.at_ms
        elif event.kind == PoolEvent.Kind.BREAKER_CLOSED and open_at is not None:
            spans.append({"x": x(open_at), "width": max(1.0, x(event.at_ms) - x(open_at))})
            open_at = None
    if open_at is not None:
        spans.append({"x": x(open_at), "width": max(1.0, CHART_WIDTH - x(open_at))})
    points.append((float(CHART_WIDTH), y(share)))
    return {
        "points": " ".join(f"{px},{py}" for px, py in points),
        "open_spans": spans,
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "half_y": y(0.5),
    }
