"""Each rule's defaults, and the overrides tenants and features set on them (`AlertRule`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from alerts.models import AlertRule, RuleKind


@dataclass(frozen=True)
class RuleSettings:
    enabled: bool = True
    threshold: float = 0.0
    window_minutes: int = 15
    min_events: int = 20


# What each number means, per rule:
# - forecast: `threshold` is the share of the budget that must be used before a forecast is
#   trusted (extrapolating three requests at 00:01 would cry wolf); `window_minutes` is how
#   far back the burn rate is measured.
# - refusal spike, upstream 429s, expired leases: `threshold` is the share of the window's
#   reservations (refused ones included for refusals) above which the rule fires.
# - silent truncation: `threshold` is how many times its own baseline (the previous
#   `BASELINE_DAYS`) the share of commits cut at `max_tokens` must be; it must also be at
#   least `TRUNCATION_FLOOR`, so a feature that never truncates does not alert on one.
# - would refuse: fires when soft or shadow limits would have refused at least
#   `min_events` reservations in the window.
DEFAULTS: dict[str, RuleSettings] = {
    RuleKind.THRESHOLD: RuleSettings(window_minutes=0, min_events=0),
    RuleKind.FORECAST: RuleSettings(threshold=0.1, window_minutes=60, min_events=0),
    RuleKind.REFUSAL_SPIKE: RuleSettings(threshold=0.2),
    RuleKind.TRUNCATION: RuleSettings(threshold=2.0, window_minutes=60),
    RuleKind.UPSTREAM_429: RuleSettings(threshold=0.05),
    RuleKind.EXPIRED_LEASES: RuleSettings(threshold=0.05),
    RuleKind.WOULD_REFUSE: RuleSettings(threshold=0.0, min_events=1),
    RuleKind.DEAD_LETTERS: RuleSettings(window_minutes=0, min_events=1),
    RuleKind.BREAKER_OPEN: RuleSettings(window_minutes=0, min_events=0),
    RuleKind.POOL_SHARE: RuleSettings(threshold=0.5, window_minutes=5, min_events=0),
    RuleKind.PROVIDER_LIMIT: RuleSettings(window_minutes=0, min_events=0),
}
BASELINE_DAYS = 7
TRUNCATION_FLOOR = 0.05


class RuleBook:
    """Every override, read once per evaluation."""

    def __init__(self, rules: list[AlertRule]) -> None:
        self._rules = {(r.kind, r.tenant_id, r.feature_id): r for r in rules}

    @classmethod
    def load(cls) -> RuleBook:
        return cls(list(AlertRule.objects.all()))

    def settings(self, kind: str, tenant_id: int | None, feature_id: int | None) -> RuleSettings:
        """The feature's override, else its tenant's, else the default; each override
        replaces only the values it sets."""
        result = DEFAULTS[kind]
        if tenant_id is None:
            return result
        scopes = dict.fromkeys([(kind, tenant_id, None), (kind, tenant_id, feature_id)])
        for scope in scopes:
            rule = self._rules.get(scope)
            if rule is not None:
                result = _overridden(result, rule)
        return result


def _overridden(settings: RuleSettings, rule: AlertRule) -> RuleSettings:
    return replace(
        settings,
        enabled=rule.enabled,
        threshold=settings.threshold if rule.threshold is None else float(rule.threshold),
        window_minutes=rule.window_minutes or settings.window_minutes,
        min_events=settings.min_events if rule.min_events is None else rule.min_events,
    )
