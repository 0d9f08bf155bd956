"""Rules on a feature's recent traffic, read from the ledger's rollups: refusal spikes,
silent truncation against the feature's own baseline, upstream 429s, expired leases, and
soft or shadow limits that would have refused. Each fires once while its condition holds
(one firing alert per rule and feature) and resolves when it no longer does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from alerts.ledger_reads import (
    Counts,
    feature_counts,
    feature_truncation_baseline,
    would_refuse_limit_ids,
)
from alerts.models import RuleKind
from alerts.rules import BASELINE_DAYS, TRUNCATION_FLOOR, RuleBook, RuleSettings
from alerts.selectors import firing_alerts
from alerts.state import Firing, alert_fire, alert_resolve
from quotas.models import Limit
from tenants.models import Feature


@dataclass(frozen=True)
class Context:
    feature: Feature
    counts: Counts
    settings: RuleSettings
    since: datetime
    until: datetime


# A rule's verdict: the details to announce when it fires, None when all is well.
Check = Callable[[Context], dict[str, Any] | None]


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _refusal_spike(ctx: Context) -> dict[str, Any] | None:
    counts, settings = ctx.counts, ctx.settings
    asked = counts.settled + counts.refused
    share = _share(counts.refused, asked)
    if asked < settings.min_events or share <= settings.threshold:
        return None
    return {"refused": counts.refused, "admitted": counts.settled, "share": round(share, 4)}


def _upstream_429(ctx: Context) -> dict[str, Any] | None:
    counts, settings = ctx.counts, ctx.settings
    share = _share(counts.upstream_429, counts.requests)
    if counts.requests < settings.min_events or share <= settings.threshold:
        return None
    share = round(share, 4)
    return {"upstream_429": counts.upstream_429, "requests": counts.requests, "share": share}


def _expired_leases(ctx: Context) -> dict[str, Any] | None:
    counts, settings = ctx.counts, ctx.settings
    share = _share(counts.expired, counts.settled)
    if counts.settled < settings.min_events or share <= settings.threshold:
        return None
    return {"expired": counts.expired, "requests": counts.settled, "share": round(share, 4)}


def _truncation(ctx: Context) -> dict[str, Any] | None:
    counts, settings = ctx.counts, ctx.settings
    if counts.requests < settings.min_events:
        return None
    feature = ctx.feature
    baseline = feature_truncation_baseline(
        tenant=feature.tenant.slug,
        feature=feature.slug,
        since=ctx.since - timedelta(days=BASELINE_DAYS),
        until=ctx.since,
    )
    base_share = _share(baseline.truncated, baseline.requests)
    share = _share(counts.truncated, counts.requests)
    if share <= max(TRUNCATION_FLOOR, base_share * settings.threshold):
        return None
    return {
        "truncated": counts.truncated,
        "requests": counts.requests,
        "share": round(share, 4),
        "baseline_share": round(base_share, 4),
    }


def _would_refuse(ctx: Context) -> dict[str, Any] | None:
    if ctx.counts.would_refuse < max(1, ctx.settings.min_events):
        return None
    limits = would_refuse_limit_ids(
        tenant=ctx.feature.tenant.slug,
        feature=ctx.feature.slug,
        since_ms=int(ctx.since.timestamp() * 1000),
        until_ms=int(ctx.until.timestamp() * 1000),
    )
    names = {limit.pk: str(limit) for limit in Limit.objects.filter(pk__in=limits)}
    by_name = {names.get(pk, f"limit {pk} (deleted)"): n for pk, n in sorted(limits.items())}
    return {"would_refuse": ctx.counts.would_refuse, "limits": by_name}


CHECKS: dict[str, Check] = {
    RuleKind.REFUSAL_SPIKE: _refusal_spike,
    RuleKind.TRUNCATION: _truncation,
    RuleKind.UPSTREAM_429: _upstream_429,
    RuleKind.EXPIRED_LEASES: _expired_leases,
    RuleKind.WOULD_REFUSE: _would_refuse,
}


def health_evaluate(*, rules: RuleBook, now: datetime) -> None:
    windows: dict[int, dict[tuple[str, str], Counts]] = {}
    features = _features_in_view()
    for kind, check in CHECKS.items():
        firing = {alert.feature_id: alert for alert in firing_alerts(kind)}
        for feature in features:
            settings = rules.settings(kind, feature.tenant_id, feature.id)
            minutes = settings.window_minutes
            if minutes not in windows:
                windows[minutes] = feature_counts(since=now - timedelta(minutes=minutes), until=now)
            counts = windows[minutes].get((feature.tenant.slug, feature.slug), Counts())
            ctx = Context(feature, counts, settings, now - timedelta(minutes=minutes), now)
            verdict = check(ctx) if settings.enabled else None
            _apply(kind, feature, verdict, firing.get(feature.id), ctx, now)


def _features_in_view() -> list[Feature]:
    return list(Feature.objects.select_related("tenant"))


def _apply(
    kind: str,
    feature: Feature,
    verdict: dict[str, Any] | None,
    alert: Any,
    ctx: Context,
    now: datetime,
) -> None:
    if verdict is None:
        if alert is not None:
            alert_resolve(alert_id=alert.id, now=now, reason="back to normal")
        return
    if alert is not None:
        return  # still firing: said once already
    details = {
        **verdict,
        "window_minutes": ctx.settings.window_minutes,
        "threshold": ctx.settings.threshold,
    }
    firing = Firing(
        key=f"{kind}:feature:{feature.id}:{int(now.timestamp() * 1000)}",
        kind=kind,
        subject=f"feature:{feature.id}",
        level=float(verdict.get("share", verdict.get("would_refuse", 0))),
        tenant_id=feature.tenant_id,
        feature_id=feature.id,
        details=details,
    )
    alert_fire(firing=firing, now=now)
