"""Rules on calendar budgets, read from the live counters in Redis: threshold crossings
(once per crossing: resolved when usage is back under it, fired again when it crosses again
in the same period, after a boost ends, the limit is lowered or usage was refunded and rose
again) and the forecast of a budget that runs out before its period ends."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from alerts.ledger_reads import scope_top_feature, scope_usage_since
from alerts.models import Alert, RuleKind
from alerts.rules import RuleBook
from alerts.selectors import firing_alerts
from alerts.state import Firing, alert_fire, alert_resolve, ms_to_datetime
from quotas.engine.periods import periods_around
from quotas.models import Limit
from quotas.plan import LimitInfo, plan_load
from quotas.usage import limit_states

BUDGET_WINDOWS = ("hour", "day", "month")
# A threshold alert resolves once usage is this share of the cap below its threshold: a
# budget hovering at its threshold (reservations held, then refunded by their commits)
# would otherwise resolve and fire again at every evaluation.
RESOLVE_MARGIN = 0.02
# The "noisy feature" of a budget shared by several is the one that used most of it lately.
NOISY_WINDOW_MINUTES = 60


@dataclass(frozen=True)
class Reading:
    """A budget's state at one moment, in engine units (tokens, requests, nano-USD)."""

    limit: Limit
    info: LimitInfo
    used: float
    cap: int
    period_start_ms: int
    period_end_ms: int
    now_ms: int

    @property
    def fraction(self) -> float:
        return self.used / self.cap if self.cap > 0 else 0.0

    @property
    def refusing(self) -> bool:
        """A hard budget that is spent refuses every call until its reset (or a boost)."""
        return self.info.enforcement == "hard" and self.fraction >= 1

    def details(self) -> dict[str, Any]:
        return {
            "limit_name": self.info.name,
            "metric": self.info.metric,
            "window": self.info.window,
            "enforcement": self.info.enforcement,
            "timezone": self.info.timezone,
            "used": self.used,
            "cap": self.cap,
            "fraction": round(self.fraction, 4),
            "reset_ms": self.period_end_ms,
            "refusing": self.refusing,
        }


def budgets_read(*, now_ms: int) -> list[Reading]:
    """Every calendar budget with an amount, read in one script call."""
    plan = plan_load()  # fresh: an evaluation must see the limits as they are now
    limits = Limit.objects.filter(window__in=BUDGET_WINDOWS, amount__isnull=False)
    rows = [row for row in limits.select_related("tenant", "feature") if row.id in plan.limits]
    # a tenant's budget on its partition, a shared one summed over them (quotas.usage)
    states = limit_states(plan, [plan.limits[row.id] for row in rows], now_ms=now_ms)
    readings = []
    for row, (check, state) in zip(rows, states, strict=True):
        info = plan.limits[row.id]
        _, start, stop, _ = periods_around(info.timezone, info.window, int(state["now_ms"]))
        readings.append(
            Reading(row, info, float(state["used"]), check.cap, start, stop, int(state["now_ms"]))
        )
    return readings


def thresholds_evaluate(*, readings: list[Reading], rules: RuleBook, now: datetime) -> None:
    current = {r.limit.id: r for r in readings}
    still_firing = set()
    for alert in firing_alerts(RuleKind.THRESHOLD):
        reading = current.get(alert.limit_id or 0)
        reason = _threshold_gone(alert.level, alert.period_start, reading, rules)
        if reason:
            details = {**alert.details, **(reading.details() if reading else {})}
            alert_resolve(alert_id=alert.id, now=now, reason=reason, details=details)
        else:
            still_firing.add(alert.subject)
    for reading in readings:
        runs_out_ms = _runs_out_at(reading, rules)
        for level in _levels(reading, rules):
            if reading.fraction >= level and _subject(reading, level) not in still_firing:
                alert_fire(firing=_threshold_firing(reading, level, runs_out_ms), now=now)


def _levels(reading: Reading, rules: RuleBook) -> list[float]:
    limit = reading.limit
    if not rules.settings(RuleKind.THRESHOLD, limit.tenant_id, limit.feature_id).enabled:
        return []
    return sorted({float(level) for level in limit.alert_at or []})


def _threshold_gone(
    level: float, period_start: datetime | None, reading: Reading | None, rules: RuleBook
) -> str:
    """Why a firing threshold alert no longer holds, or "" while it does."""
    if reading is None:
        return "the limit was removed or is no longer a budget"
    if period_start != ms_to_datetime(reading.period_start_ms):
        return "a new period began"
    if level not in _levels(reading, rules):
        return "the threshold was removed"
    if reading.fraction < level - RESOLVE_MARGIN:
        return "usage is back under the threshold"
    return ""


def _threshold_firing(reading: Reading, level: float, runs_out_ms: int | None) -> Firing:
    limit = reading.limit
    details = {**reading.details(), **_noisy_feature(reading)}
    if runs_out_ms is not None:
        details["runs_out_ms"] = runs_out_ms  # the owner reads the forecast with the threshold
    subject = _subject(reading, level)
    return Firing(
        key=_crossing_key(f"threshold:{subject}", RuleKind.THRESHOLD, subject, reading),
        kind=RuleKind.THRESHOLD,
        subject=subject,
        level=level,
        tenant_id=limit.tenant_id,
        feature_id=limit.feature_id,
        limit_id=limit.id,
        period_start=ms_to_datetime(reading.period_start_ms),
        period_end=ms_to_datetime(reading.period_end_ms),
        details=details,
        refusing=level >= 1 and reading.refusing,
    )


def _subject(reading: Reading, level: float | None = None) -> str:
    """What a budget alert is about: the limit, and the threshold if it is a threshold's."""
    limit = f"limit:{reading.limit.id}"
    return limit if level is None else f"{limit}@{level}"


def _crossing_key(base: str, kind: str, subject: str, reading: Reading) -> str:
    """The claim of this crossing: the period and how many crossings of it came before.
    Two workers that see the same crossing count the same and write the same key, so one
    alert is inserted; a crossing after the last one resolved counts one more, and fires."""
    before = Alert.objects.filter(
        kind=kind, subject=subject, period_start=ms_to_datetime(reading.period_start_ms)
    ).count()
    return f"{base}:{reading.period_start_ms}#{before + 1}"


def _noisy_feature(reading: Reading) -> dict[str, Any]:
    """For a budget shared by several features (a tenant's, a pool's): the one that used
    most of it in the last hour, the one whose pause helps most."""
    if reading.limit.feature_id is not None:
        return {}
    since_ms = reading.now_ms - NOISY_WINDOW_MINUTES * 60_000
    top = scope_top_feature(scope=reading.info.scope, metric=reading.info.metric, since_ms=since_ms)
    if top is None:
        return {}
    tenant, feature, used = top
    return {"noisy_feature": f"{tenant}/{feature}", "noisy_used": used}


def forecasts_evaluate(*, readings: list[Reading], rules: RuleBook, now: datetime) -> None:
    current = {r.limit.id: r for r in readings}
    still_firing = set()
    for alert in firing_alerts(RuleKind.FORECAST):
        reading = current.get(alert.limit_id or 0)
        if reading is None or alert.period_start != ms_to_datetime(reading.period_start_ms):
            reason = "a new period began" if reading else "the limit was removed"
        elif _runs_out_at(reading, rules) is None and reading.fraction < 1:
            reason = "the budget now lasts the period"
        else:
            still_firing.add(alert.subject)
            continue
        details = {**alert.details, **(reading.details() if reading else {})}
        details.pop("runs_out_ms", None)  # what it said then; it no longer runs out
        alert_resolve(alert_id=alert.id, now=now, reason=reason, details=details)
    for reading in readings:
        runs_out_ms = _runs_out_at(reading, rules)
        if runs_out_ms is not None and _subject(reading) not in still_firing:
            alert_fire(firing=_forecast_firing(reading, runs_out_ms), now=now)


def _runs_out_at(reading: Reading, rules: RuleBook) -> int | None:
    """When the budget runs out at the recent burn rate, if that is before its period ends."""
    limit = reading.limit
    settings = rules.settings(RuleKind.FORECAST, limit.tenant_id, limit.feature_id)
    if not settings.enabled or reading.fraction < settings.threshold or reading.fraction >= 1:
        return None
    rate = _burn_rate_per_ms(reading, settings.window_minutes)
    if rate <= 0:
        return None
    runs_out_ms = reading.now_ms + int((reading.cap - reading.used) / rate)
    return runs_out_ms if runs_out_ms < reading.period_end_ms else None


def _burn_rate_per_ms(reading: Reading, window_minutes: int) -> float:
    """The ledger's usage of the limit's scope over the last `window_minutes` (within this
    period); while the ledger has none, the period's average so far."""
    since_ms = max(reading.period_start_ms, reading.now_ms - window_minutes * 60_000)
    elapsed_ms = reading.now_ms - since_ms
    recent = scope_usage_since(
        scope=reading.info.scope, metric=reading.info.metric, since_ms=since_ms
    )
    if recent and elapsed_ms > 0:
        return recent / elapsed_ms
    period_elapsed = reading.now_ms - reading.period_start_ms
    return reading.used / period_elapsed if period_elapsed > 0 else 0.0


def _forecast_firing(reading: Reading, runs_out_ms: int) -> Firing:
    limit = reading.limit
    subject = _subject(reading)
    return Firing(
        key=_crossing_key(f"forecast:{subject}", RuleKind.FORECAST, subject, reading),
        kind=RuleKind.FORECAST,
        subject=subject,
        level=round(reading.fraction, 4),
        tenant_id=limit.tenant_id,
        feature_id=limit.feature_id,
        limit_id=limit.id,
        period_start=ms_to_datetime(reading.period_start_ms),
        period_end=ms_to_datetime(reading.period_end_ms),
        details={**reading.details(), **_noisy_feature(reading), "runs_out_ms": runs_out_ms},
    )
