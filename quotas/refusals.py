"""What a refusal says: the error, its headers, and the limit that refused."""

from __future__ import annotations

import math
from typing import Any

from quotas.engine import Refused, Unavailable
from quotas.errors import QuotaError
from quotas.plan import NANO, Plan


def refusal_error(refused: Refused, plan: Plan) -> QuotaError:
    limit = plan.limits.get(refused.limit_id)
    described = limit_body(plan, refused.limit_id, refused.cap, refused.remaining, None)
    retry_ms = refused.retry_after_ms
    headers: dict[str, str] = {}
    if retry_ms is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_ms / 1000)))
    elif refused.reason == "concurrency":
        retry_ms = 1000
        headers["Retry-After"] = "1"
    code = "budget_exhausted" if refused.reason == "budget_exhausted" else "rate_limited"
    name = limit.name if limit else f"limit {refused.limit_id}"
    if refused.retry_after_ms is None and refused.reason != "concurrency":
        message = f"The request needs more than the limit '{name}' can ever admit."
    elif code == "budget_exhausted":
        message = f"Budget exhausted: '{name}'. It resets in {headers['Retry-After']} s."
    else:
        message = f"Rate limited by '{name}'. Retry in {headers['Retry-After']} s."
    return QuotaError(code, message, headers=headers, limit=described, retry_after_ms=retry_ms)


def upstream_error(refused: Unavailable) -> QuotaError:
    """Every candidate pool's breaker is open: the provider is failing there."""
    seconds = max(1, math.ceil(refused.retry_after_ms / 1000))
    return QuotaError(
        "upstream_unavailable",
        f"The provider is failing on pool '{refused.pool}' (its circuit breaker is open) and "
        f"no other pool can take the call. Retry in {seconds} s.",
        headers={"Retry-After": str(seconds)},
        pool=refused.pool,
        retry_after_ms=refused.retry_after_ms,
    )


def units_shown(metric: str, units: float) -> float | int:
    """Engine units as the API shows them: USD for cost, whole tokens or requests."""
    return round(units / float(NANO), 9) if metric == "cost_usd" else math.floor(units)


def limit_body(
    plan: Plan, limit_id: int, cap: int, remaining: float, reset_ms: int | None
) -> dict[str, Any]:
    """A limit as the API shows it, in the metric's own units (USD for cost)."""
    limit = plan.limits.get(limit_id)
    metric = limit.metric if limit else ""

    def show(units: float) -> float | int:
        return units_shown(metric, units)

    body: dict[str, Any] = {
        "id": limit_id,
        "name": limit.name if limit else "",
        "scope": limit.scope if limit else {},
        "metric": metric,
        "window": (limit.window or None) if limit else None,
        "enforcement": limit.enforcement if limit else "hard",
        "limit": show(cap),
        "remaining": show(max(0.0, remaining)),
    }
    if reset_ms is not None:
        body["reset"] = reset_ms
    return body


# -- commit, release, extend, read -----------------------------------------------------------
