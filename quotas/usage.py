"""Reads of live usage, for the API's usage endpoint and the admin."""

from __future__ import annotations

import math
from typing import Any

import redis

from quotas.errors import QuotaError, not_found
from quotas.plan import KeyInfo, plans
from quotas.refusals import limit_body
from quotas.reservations import get_engine


def feature_usage(*, key: KeyInfo, slug: str) -> dict[str, Any]:
    plan = plans.get()
    feature = plan.features.get((key.tenant_id, slug))
    if feature is None:
        raise not_found(f"feature '{slug}'")
    if key.feature_ids and feature.id not in key.feature_ids:
        raise QuotaError("forbidden", f"This API key may not act for feature '{slug}'.")
    engine = get_engine()
    limits = plan.feature_limits(feature)
    checks = [
        plan.inspection_check(limit, engine.keys, engine.now_ms_estimate()) for limit in limits
    ]
    try:
        states = engine.inspect(checks)
    except redis.RedisError as exc:
        raise QuotaError(
            "unavailable",
            "The quota store is unavailable; try again shortly.",
            headers={"Retry-After": "1"},
        ) from exc
    rows = []
    for check, state in zip(checks, states, strict=True):
        body = limit_body(plan, check.limit_id, check.cap, state["remaining"], None)
        body["used"] = body["limit"] - body["remaining"]
        if state.get("reset_ms") is not None:
            body["reset_seconds"] = max(0, math.ceil((state["reset_ms"] - state["now_ms"]) / 1000))
        rows.append(body)
    return {
        "feature": feature.slug,
        "status": feature.status,
        "priority": feature.priority,
        "limits": rows,
    }
