"""The rules a limit must satisfy, and the words it is shown in.

One place, used by the admin (through `Limit.clean`), by `quota apply` and by the services.
Errors are keyed by field so that each caller can say where the problem is.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING

from django.core.exceptions import ValidationError

if TYPE_CHECKING:  # annotations only: the model imports this module to run its rules
    from quotas.models import Limit

TOKEN_METRICS = {"tokens", "input_tokens", "output_tokens"}
_Add = Callable[[str, str], None]

WHOLE_METRICS = TOKEN_METRICS | {"requests", "concurrent"}
WINDOW_WORDS = {"minute": "per minute", "hour": "per hour", "day": "per day", "month": "per month"}
METRIC_WORDS = {
    "requests": "requests",
    "tokens": "tokens",
    "input_tokens": "input tokens",
    "output_tokens": "output tokens",
    "cost_usd": "USD",
    "concurrent": "concurrent requests",
}


def limit_validate(limit: Limit) -> None:
    errors: dict[str, list[str]] = {}

    def add(field: str, message: str) -> None:
        errors.setdefault(field, []).append(message)

    _check_scope(limit, add)
    _check_window(limit, add)
    _check_amounts(limit, add)
    _check_boost(limit, add)
    _check_burst(limit, add)
    _check_alert_at(limit, add)
    if not errors:
        _check_guarantee_fits_pool(limit, add)
        _check_capacity_covers_guarantees(limit, add)
        _check_unique(limit, add)
    if errors:
        raise ValidationError(errors)


def _check_scope(limit: Limit, add: _Add) -> None:
    tenant, feature, pool, model = limit.tenant, limit.feature, limit.pool, limit.model
    if not (tenant or feature or pool or model):
        add("tenant", "A limit needs a scope: a tenant, feature, pool or model (or several).")
    if feature is not None:
        if tenant is None:
            limit.tenant = feature.tenant
        elif feature.tenant_id != tenant.pk:
            add("feature", f"no feature '{feature.slug}' in tenant '{tenant.slug}'")
    if (
        model is not None
        and pool is not None
        and not pool.served_models.filter(pk=model.pk).exists()
    ):
        add("model", f"pool '{pool.slug}' does not serve model '{model.name}'")


def _check_window(limit: Limit, add: _Add) -> None:
    if limit.metric == "concurrent":
        if limit.window:
            add(
                "window",
                "A concurrency limit counts calls in flight at any instant; it takes no window.",
            )
    elif not limit.window:
        add("window", "Choose a window: minute, hour, day or month.")
    elif limit.window not in WINDOW_WORDS:
        add("window", f"'{limit.window}' is not a window (minute, hour, day or month).")


def _check_amounts(limit: Limit, add: _Add) -> None:
    if limit.amount is None and limit.guaranteed is None:
        add("amount", "Give an amount (or, for a feature on a pool, a guaranteed share).")
    for field in ("amount", "guaranteed"):
        value: Decimal | None = getattr(limit, field)
        if value is None:
            continue
        if value <= 0:
            add(field, f"The {field} must be greater than zero.")
        elif limit.metric in WHOLE_METRICS and value != value.to_integral_value():
            add(field, f"The {field} of a {METRIC_WORDS[limit.metric]} limit is a whole number.")
    if limit.guaranteed is not None:
        if not (limit.feature_id and limit.pool_id):
            add("guaranteed", "A guaranteed share is given to a feature on a pool: name both.")
        if limit.window != "minute" or limit.metric not in TOKEN_METRICS | {"requests"}:
            add("guaranteed", "A guaranteed share applies to per-minute token or request limits.")
        if limit.enforcement != "hard":
            add("guaranteed", "A guaranteed share is only meaningful on a hard limit.")
        if limit.amount is not None and limit.amount < limit.guaranteed:
            add("amount", "The ceiling (amount) cannot be below the guaranteed share.")


def _check_burst(limit: Limit, add: _Add) -> None:
    burst = limit.burst
    if burst is None:
        return
    if limit.window != "minute" or limit.amount is None:
        add("burst", "A burst is the depth of a per-minute limit's bucket: give a minute amount.")
    elif burst <= 0 or burst > limit.amount:
        add("burst", "The burst must be greater than zero and at most the amount.")
    elif limit.metric in WHOLE_METRICS and burst != burst.to_integral_value():
        add("burst", f"The burst of a {METRIC_WORDS[limit.metric]} limit is a whole number.")


def _check_boost(limit: Limit, add: _Add) -> None:
    """The shape of a boost; whether it raises the amount and ends in the future is checked
    where one is set (`quotas.boosts.limit_boost`), so that a boost overtaken by a later
    amount, or ended, never blocks saving the limit."""
    if (limit.boost_amount is None) != (limit.boost_until is None):
        add("boost_amount", "A boost needs both a boosted amount and when it ends.")
        return
    boosted = limit.boost_amount
    if boosted is None:
        return
    if boosted <= 0:
        add("boost_amount", "The boosted amount must be greater than zero.")
    elif limit.metric in WHOLE_METRICS and boosted != boosted.to_integral_value():
        words = METRIC_WORDS[limit.metric]
        add("boost_amount", f"The boosted amount of a {words} limit is a whole number.")


def _check_alert_at(limit: Limit, add: _Add) -> None:
    values = limit.alert_at
    if values in (None, ""):
        limit.alert_at = []
        return
    ok = isinstance(values, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 2 for v in values
    )
    if not ok:
        add("alert_at", "Alert thresholds are fractions of the amount, e.g. [0.5, 0.8, 1.0].")
    else:
        limit.alert_at = sorted(set(values))


def _check_guarantee_fits_pool(limit: Limit, add: _Add) -> None:
    pool, guaranteed = limit.pool, limit.guaranteed
    if guaranteed is None or pool is None:
        return
    capacity = (
        pool.limits.filter(
            tenant=None, feature=None, model=None, metric=limit.metric, window="minute"
        )
        .values_list("amount", flat=True)
        .first()
    )
    metric = METRIC_WORDS[limit.metric]
    if capacity is None:
        add(
            "guaranteed",
            f"pool '{pool.slug}' has no per-minute {metric} limit to guarantee a share of",
        )
        return
    others = (
        pool.limits.filter(metric=limit.metric, window="minute")
        .exclude(guaranteed=None)
        .exclude(pk=limit.pk)
        .values_list("guaranteed", flat=True)
    )
    total = sum((g for g in others if g is not None), Decimal(0)) + guaranteed
    if total > capacity:
        add(
            "guaranteed",
            f"guarantees on pool '{pool.slug}' would add up to {_number(total)} {metric} per "
            f"minute, more than its capacity of {_number(capacity)}",
        )


def _check_capacity_covers_guarantees(limit: Limit, add: _Add) -> None:
    """Lowering a pool's capacity must not leave its guarantees uncovered."""
    pool, amount = limit.pool, limit.amount
    is_capacity = pool is not None and not (limit.tenant or limit.feature or limit.model)
    if not is_capacity or limit.window != "minute" or amount is None or pool is None:
        return
    guaranteed = (
        pool.limits.filter(metric=limit.metric, window="minute")
        .exclude(guaranteed=None)
        .exclude(pk=limit.pk)
        .values_list("guaranteed", flat=True)
    )
    total = sum((g for g in guaranteed if g is not None), Decimal(0))
    if total > Decimal(str(amount)):
        add(
            "amount",
            f"guarantees on pool '{pool.slug}' would add up to {_number(total)} "
            f"{METRIC_WORDS[limit.metric]} per minute, more than its capacity of "
            f"{_number(Decimal(str(amount)))}",
        )


def _check_unique(limit: Limit, add: _Add) -> None:
    # through the limit's own class, as Django's unique checks do: `Limit.clean` runs these
    # rules, so this module is below the model and never imports it
    limits = type(limit)._default_manager
    twins = limits.filter(
        tenant=limit.tenant,
        feature=limit.feature,
        pool=limit.pool,
        model=limit.model,
        metric=limit.metric,
        window=limit.window,
    ).exclude(pk=limit.pk)
    if twins.exists():
        add("metric", f"This scope already has a {limit_describe_rule(limit)} limit.")


def limit_scope_words(limit: Limit) -> str:
    """'acme / chat on openai-shared for gpt-4o-mini'; a bare pool limit is 'openai-shared'."""
    return scope_words(
        limit.tenant.slug if limit.tenant is not None else None,
        limit.feature.slug if limit.feature is not None else None,
        limit.pool.slug if limit.pool is not None else None,
        limit.model.name if limit.model is not None else None,
    )


def scope_words(
    tenant: str | None, feature: str | None, pool: str | None, model: str | None
) -> str:
    """A scope in words, from the slugs of its parts (None: not part of it)."""
    who = " / ".join(part for part in (tenant, feature) if part is not None)
    words = [who] if who else []
    if pool is not None:
        words.append(f"on {pool}" if who else pool)
    if model is not None:
        words.append(f"for {model}" if words else model)
    return " ".join(words) or "everything"


def limit_describe_rule(limit: Limit) -> str:
    """'tokens per minute', 'concurrent requests'; cost reads '$500 per month', so no 'USD'."""
    return rule_words(limit.metric, limit.window)


def rule_words(metric: str, window: str) -> str:
    words = METRIC_WORDS.get(metric, metric)
    if metric == "concurrent":
        return words
    window_words = WINDOW_WORDS.get(window, window)
    return window_words if metric == "cost_usd" else f"{words} {window_words}"


def limit_describe(limit: Limit) -> str:
    """A limit in words: 'acme / chat on openai-shared: 20,000 tokens per minute, guaranteed'."""
    return limit_words(
        limit_scope_words(limit),
        limit.metric,
        limit.window,
        limit.amount,
        limit.guaranteed,
        limit.enforcement,
    )


def limit_words(
    scope: str,
    metric: str,
    window: str,
    amount: Decimal | int | str | None,
    guaranteed: Decimal | int | str | None,
    enforcement: str,
) -> str:
    """`limit_describe` from the limit's fields, the scope already in words."""
    parts = []
    if amount is not None:
        parts.append(f"{_amount_words(metric, amount)} {rule_words(metric, window)}")
        if guaranteed is not None:
            parts.append(f"of which {_amount_words(metric, guaranteed)} guaranteed")
    elif guaranteed is not None:
        parts.append(f"{_amount_words(metric, guaranteed)} {rule_words(metric, window)}")
        parts.append("guaranteed")
    if enforcement != "hard":
        parts.append(f"{enforcement} (not enforced)")
    return f"{scope}: {', '.join(parts)}"


def _amount_words(metric: str, value: Decimal | int | str) -> str:
    value = Decimal(str(value))  # unsaved rows may still hold an int or a str
    if metric == "cost_usd":
        return f"${value:,.2f}" if value == value.quantize(Decimal("0.01")) else f"${value:,f}"
    return _number(value)


def _number(value: Decimal) -> str:
    if value == value.to_integral_value():
        return f"{int(value):,}"
    return f"{value.normalize():,f}"
