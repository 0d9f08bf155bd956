"""Rules on calendar budgets, read from the live counters in Redis: threshold crossings
(once per threshold and period, resolved when usage is back under it) and the forecast of
a budget that runs out before its period ends."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from alerts.ledger_reads import scope_usage_since
from alerts.models import RuleKind
from alerts.rules import RuleBook
from alerts.selectors import firing_alerts
from alerts.state import Firing, alert_fire, alert_resolve, ms_to_datetime
from quotas.engine.periods import periods_around
from quotas.models import Limit
from quotas.plan import LimitInfo, plan_load
from quotas.store import get_engine

BUDGET_WINDOWS = ("hour", "day", "month")


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
        }


def budgets_read(*, now_ms: int) -> list[Reading]:
    """Every calendar budget with an amount, read in one script call."""
    plan = plan_load()  # fresh: an evaluation must see the limits as they are now
    engine = get_engine()
    limits = Limit.objects.filter(window__in=BUDGET_WINDOWS, amount__isnull=False)
    rows = [row for row in limits.select_related("tenant", "feature") if row.id in plan.limits]
    checks = [plan.inspection_check(plan.limits[row.id], engine.keys, now_ms) for row in rows]
    states = engine.inspect(checks)
    readings = []
    for row, check, state in zip(rows, checks, states, strict=True):
        info = plan.limits[row.id]
        _, start, stop, _ = periods_around(info.timezone, info.window, int(state["now_ms"]))
        readings.append(
            Reading(row, info, float(state["used"]), check.cap, start, stop, int(state["now_ms"]))
        )
    return readings


def thresholds_evaluate(*, readings: list[Reading], rules: RuleBook, now: datetime) -> None:
    current = {r.limit.id: r for r in readings}
    for alert in firing_alerts(RuleKind.THRESHOLD):
        reading = current.get(alert.limit_id or 0)
        reason = _threshold_gone(alert.level, alert.period_start, reading, rules)
        if reason:
            details = {**alert.details, **(reading.details() if reading else {})}
            alert_resolve(alert_id=alert.id, now=now, reason=reason, details=details)
    for reading in readings:
        runs_out_ms = _runs_out_at(reading, rules)
        for level in _levels(reading, rules):
            if reading.fraction >= level:
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
    if reading.fraction < level:
        return "usage is back under the threshold"
    return ""


def _threshold_firing(reading: Reading, level: float, runs_out_ms: int | None) -> Firing:
    limit = reading.limit
    details = reading.details()
    if runs_out_ms is not None:
        details["runs_out_ms"] = runs_out_ms  # the owner reads the forecast with the threshold
    return Firing(
        key=f"threshold:limit:{limit.id}@{level}:{reading.period_start_ms}",
        kind=RuleKind.THRESHOLD,
        subject=f"limit:{limit.id}@{level}",
        level=level,
        tenant_id=limit.tenant_id,
        feature_id=limit.feature_id,
        limit_id=limit.id,
        period_start=ms_to_datetime(reading.period_start_ms),
        period_end=ms_to_datetime(reading.period_end_ms),
        details=details,
    )


def forecasts_evaluate(*, readings: list[Reading], rules: RuleBook, now: datetime) -> None:
    current = {r.limit.id: r for r in readings}
    for alert in firing_alerts(RuleKind.FORECAST):
        reading = current.get(alert.limit_id or 0)
        if reading is None or alert.period_start != ms_to_datetime(reading.period_start_ms):
            alert_resolve(alert_id=alert.id, now=now, reason="a new period began")
        elif _runs_out_at(reading, rules) is None and reading.fraction < 1:
            alert_resolve(alert_id=alert.id, now=now, reason="the budget now lasts the period")
    for reading in readings:
        runs_out_ms = _runs_out_at(reading, rules)
        if runs_out_ms is not None:
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
    return Firing(
        key=f"forecast:limit:{limit.id}:{reading.period_start_ms}",
        kind=RuleKind.FORECAST,
        subject=f"limit:{limit.id}",
        level=round(reading.fraction, 4),
        tenant_id=limit.tenant_id,
        feature_id=limit.feature_id,
        limit_id=limit.id,
        period_start=ms_to_datetime(reading.period_start_ms),
        period_end=ms_to_datetime(reading.period_end_ms),
        details={**reading.details(), "runs_out_ms": runs_out_ms},
    )
