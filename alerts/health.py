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
    refusals_by_limit,
    scope_top_feature,
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


# A rule's reading of the window: whether it fires, and the numbers it measured, which a
# firing alert announces and a resolve reports as they are then.
@dataclass(frozen=True)
class Verdict:
    fires: bool
    details: dict[str, Any]


Check = Callable[[Context], Verdict]


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _rate(ctx: Context, part: int, whole: int) -> tuple[bool, float]:
    """Whether `part` of `whole` is above the rule's threshold (with enough events)."""
    share = _share(part, whole)
    return whole >= ctx.settings.min_events and share > ctx.settings.threshold, round(share, 4)


def _refusal_spike(ctx: Context) -> Verdict:
    counts = ctx.counts
    fires, share = _rate(ctx, counts.refused, counts.settled + counts.refused)
    details = {"refused": counts.refused, "admitted": counts.settled, "share": share}
    if fires:
        details.update(_refusing_limits(ctx))
    return Verdict(fires, details)


def _refusing_limits(ctx: Context) -> dict[str, Any]:
    """Which limits refused, the most first, each said whose it is: a shared pool's capacity
    (the platform's to raise), the tenant's, or the feature's own."""
    by_limit = refusals_by_limit(
        tenant=ctx.feature.tenant.slug,
        feature=ctx.feature.slug,
        since_ms=int(ctx.since.timestamp() * 1000),
        until_ms=int(ctx.until.timestamp() * 1000),
    )
    limits = Limit.objects.select_related("tenant", "feature", "pool", "model").in_bulk(
        [pk for pk in by_limit if pk is not None]
    )
    # Shares, not counts: the refusals are read as ingested, the rollups a little later, so
    # counts of the two would disagree by the rollups' lag.
    total = sum(by_limit.values())
    refused_by = []
    for pk, count in sorted(by_limit.items(), key=lambda item: (-item[1], item[0] or 0)):
        limit = limits.get(pk or 0)
        refused_by.append(
            {
                "limit_id": limit.pk if limit else None,
                "limit_name": str(limit) if limit else "a limit since deleted",
                "whose": _whose(limit),
                "percent": round(100 * count / total),
            }
        )
    details: dict[str, Any] = {"refused_by": refused_by}
    top = limits.get(refused_by[0]["limit_id"] or 0) if refused_by else None
    if top is not None and top.feature_id is None:
        # a shared limit: the feature that used most of it is the one to pause
        noisy = scope_top_feature(
            scope=_scope(top), metric=top.metric, since_ms=int(ctx.since.timestamp() * 1000)
        )
        if noisy is not None:
            details["noisy_feature"] = f"{noisy[0]}/{noisy[1]}"
    return details


def _scope(limit: Limit) -> dict[str, str]:
    """A limit's scope as the rollups name it (slugs, the model's name)."""
    names = {
        "tenant": limit.tenant.slug if limit.tenant else None,
        "feature": limit.feature.slug if limit.feature else None,
        "pool": limit.pool.slug if limit.pool else None,
        "model": limit.model.name if limit.model else None,
    }
    return {part: name for part, name in names.items() if name is not None}


def _whose(limit: Limit | None) -> str:
    if limit is None:
        return ""
    if limit.tenant_id is None:
        return "the shared pool's"
    return "the tenant's" if limit.feature_id is None else "the feature's own"


def _upstream_429(ctx: Context) -> Verdict:
    counts = ctx.counts
    fires, share = _rate(ctx, counts.upstream_429, counts.requests)
    details = {"upstream_429": counts.upstream_429, "requests": counts.requests, "share": share}
    return Verdict(fires, details)


def _expired_leases(ctx: Context) -> Verdict:
    counts = ctx.counts
    fires, share = _rate(ctx, counts.expired, counts.settled)
    return Verdict(fires, {"expired": counts.expired, "requests": counts.settled, "share": share})


def _truncation(ctx: Context) -> Verdict:
    counts, settings = ctx.counts, ctx.settings
    share = _share(counts.truncated, counts.requests)
    details: dict[str, Any] = {
        "truncated": counts.truncated,
        "requests": counts.requests,
        "share": round(share, 4),
    }
    if counts.requests < settings.min_events:
        return Verdict(False, details)
    feature = ctx.feature
    baseline = feature_truncation_baseline(
        tenant=feature.tenant.slug,
        feature=feature.slug,
        since=ctx.since - timedelta(days=BASELINE_DAYS),
        until=ctx.since,
    )
    base_share = _share(baseline.truncated, baseline.requests)
    details["baseline_share"] = round(base_share, 4)
    return Verdict(share > max(TRUNCATION_FLOOR, base_share * settings.threshold), details)


def _would_refuse(ctx: Context) -> Verdict:
    details: dict[str, Any] = {"would_refuse": ctx.counts.would_refuse}
    if ctx.counts.would_refuse < max(1, ctx.settings.min_events):
        return Verdict(False, details)
    limits = would_refuse_limit_ids(
        tenant=ctx.feature.tenant.slug,
        feature=ctx.feature.slug,
        since_ms=int(ctx.since.timestamp() * 1000),
        until_ms=int(ctx.until.timestamp() * 1000),
    )
    names = {limit.pk: str(limit) for limit in Limit.objects.filter(pk__in=limits)}
    by_name = {names.get(pk, f"limit {pk} (deleted)"): n for pk, n in sorted(limits.items())}
    return Verdict(True, {**details, "limits": by_name})


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
    verdict: Verdict | None,
    alert: Any,
    ctx: Context,
    now: datetime,
) -> None:
    measured = {
        **(verdict.details if verdict else {}),
        "window_minutes": ctx.settings.window_minutes,
        "threshold": ctx.settings.threshold,
    }
    if verdict is None or not verdict.fires:
        if alert is not None:
            reason = "back to normal" if verdict else "the rule was turned off"
            details = {**alert.details, **measured}
            alert_resolve(alert_id=alert.id, now=now, reason=reason, details=details)
        return
    if alert is not None:
        return  # still firing: said once already
    firing = Firing(
        key=f"{kind}:feature:{feature.id}:{int(now.timestamp() * 1000)}",
        kind=kind,
        subject=f"feature:{feature.id}",
        level=float(verdict.details.get("share", verdict.details.get("would_refuse", 0))),
        tenant_id=feature.tenant_id,
        feature_id=feature.id,
        details=measured,
    )
    alert_fire(firing=firing, now=now)
