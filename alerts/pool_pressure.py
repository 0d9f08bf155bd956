"""A pool following its provider, told to its owners (the platform's: a pool is shared
capacity), from the pool events the ledger keeps (`ledger.models.PoolEvent`):

- breaker open: the provider fails on the pool and reservations skip it (or are refused with
  503 when no other pool serves them). Critical: a refusing alert, delivered at once (and
  its resolve too). Fires when the breaker opens, resolves when it closes.
- low share: an adaptive pool's share of its configured capacity has stayed under
  `LOW_SHARE` for `window_minutes` (default 5): the provider admits much less than
  configured. Resolves once the share is back at or above it.
- provider limit: the provider stated a limit below the pool's configured one ("the provider
  allows X, the pool is configured for Y"); once per pool, metric and configured amount.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from alerts.models import RuleKind
from alerts.rules import RuleBook
from alerts.selectors import firing_alerts
from alerts.state import Firing, alert_fire, alert_resolve, ms_to_datetime
from ledger.models import PoolEvent

LOW_SHARE = 0.5
# How far back the pool events are read: a breaker that stays open reopens (an event) after
# every failed probe, and a share that stays low has its last move within this.
LOOKBACK = timedelta(days=7)


@dataclass
class PoolStates:
    """What the pool events say now, pool by pool."""

    open_breakers: dict[str, PoolEvent] = field(default_factory=dict)  # the opening event
    shares: dict[str, list[PoolEvent]] = field(default_factory=dict)  # adapted, oldest first
    provider_limits: dict[tuple[str, str], PoolEvent] = field(default_factory=dict)  # latest

    def low_shares(self, below: float) -> dict[str, tuple[float, int]]:
        """Pools whose share is under `below` now: the share, and since when (ms)."""
        low = {}
        for pool, events in self.shares.items():
            since = None
            for event in events:
                if event.share is not None and event.share < below:
                    since = event.at_ms if since is None else since
                else:
                    since = None
            if since is not None and events[-1].share is not None:
                low[pool] = (events[-1].share, since)
        return low


def pool_states(now: datetime) -> PoolStates:
    states = PoolStates()
    since_ms = int((now - LOOKBACK).timestamp() * 1000)
    for event in PoolEvent.objects.filter(at_ms__gte=since_ms).order_by("at_ms", "id"):
        if event.kind == PoolEvent.Kind.BREAKER_OPENED:
            states.open_breakers[event.pool] = event
        elif event.kind == PoolEvent.Kind.BREAKER_CLOSED:
            states.open_breakers.pop(event.pool, None)
        elif event.kind == PoolEvent.Kind.ADAPTED:
            states.shares.setdefault(event.pool, []).append(event)
        else:
            states.provider_limits[(event.pool, str(event.detail.get("metric")))] = event
    return states


def pool_pressure_evaluate(*, rules: RuleBook, now: datetime) -> None:
    states = pool_states(now)
    _breakers_evaluate(states, now)
    settings = rules.settings(RuleKind.POOL_SHARE, None, None)
    if settings.enabled:
        _shares_evaluate(states, now, timedelta(minutes=settings.window_minutes))
    _provider_limits_fire(states, now)


def _breakers_evaluate(states: PoolStates, now: datetime) -> None:
    for pool, opened in states.open_breakers.items():
        alert_fire(
            firing=Firing(
                key=f"breaker_open:{pool}:{opened.at_ms}",
                kind=RuleKind.BREAKER_OPEN,
                subject=f"pool:{pool}",
                level=1.0,
                details={"pool": pool, **opened.detail},
                refusing=True,  # critical: it goes out at once, not in the next digest
            ),
            now=now,
        )
    for alert in firing_alerts(RuleKind.BREAKER_OPEN):
        if alert.details.get("pool") not in states.open_breakers:
            alert_resolve(alert_id=alert.id, now=now, reason="the breaker closed")


def _shares_evaluate(states: PoolStates, now: datetime, window: timedelta) -> None:
    low = {}
    for pool, (share, since_ms) in states.low_shares(LOW_SHARE).items():
        if ms_to_datetime(since_ms) <= now - window:
            low[pool] = share
            alert_fire(
                firing=Firing(
                    key=f"pool_share:{pool}:{since_ms}",
                    kind=RuleKind.POOL_SHARE,
                    subject=f"pool:{pool}",
                    level=share,
                    details={
                        "pool": pool,
                        "share": share,
                        "since_ms": since_ms,
                        "window_minutes": int(window.total_seconds() // 60),
                    },
                ),
                now=now,
            )
    for alert in firing_alerts(RuleKind.POOL_SHARE):
        if alert.details.get("pool") not in low:
            alert_resolve(alert_id=alert.id, now=now, reason="the share is back above half")


def _provider_limits_fire(states: PoolStates, now: datetime) -> None:
    """Once per pool, metric and configured amount (the key says which); an alert is
    resolved when the pool is configured anew and the provider's limit reported again."""
    keys = set()
    for (pool, metric), event in states.provider_limits.items():
        key = f"provider_limit:{pool}:{metric}:{event.detail.get('configured')}"
        keys.add(key)
        alert_fire(
            firing=Firing(
                key=key,
                kind=RuleKind.PROVIDER_LIMIT,
                subject=f"pool:{pool}:{metric}",
                level=float(event.detail.get("limit", 0)),
                details={"pool": pool, **event.detail},
            ),
            now=now,
        )
    for alert in firing_alerts(RuleKind.PROVIDER_LIMIT):
        if alert.key not in keys:
            alert_resolve(alert_id=alert.id, now=now, reason="the pool was configured anew")
