"""Reads of live usage, for the API's usage endpoint and the admin's pages."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from quotas.errors import QuotaError, not_found
from quotas.plan import KeyInfo, LimitInfo, Plan, plans
from quotas.recovery import store_lost
from quotas.refusals import limit_body, units_shown
from quotas.reservations import STORE_DOWN, STORE_LOST, get_engine, key_recheck
from quotas.store import STORE_UNREACHABLE, config_version_read

CHUNK = 2_000  # limits per script call: a long script would hold up every reservation


def limits_read(plan: Plan, limits: Iterable[LimitInfo]) -> list[dict[str, Any]]:
    """Each limit's state now, read from the engine (one script call per CHUNK limits), as
    the API shows a limit (id, name, scope, metric, window, enforcement, limit, remaining)
    plus `used` and `reset_seconds` (when the bucket is full again, or the budget's period
    ends). Raises one of STORE_UNREACHABLE when the store is down."""
    engine = get_engine()
    now_ms = engine.now_ms_estimate()
    checks = [plan.inspection_check(limit, engine.keys, now_ms) for limit in limits]
    states = [
        state
        for start in range(0, len(checks), CHUNK)
        for state in engine.inspect(checks[start : start + CHUNK])
    ]
    rows = []
    for check, state in zip(checks, states, strict=True):
        body = limit_body(plan, check.limit_id, check.cap, state["remaining"], None)
        body["used"] = body["limit"] - body["remaining"]
        if body["metric"] == "cost_usd":  # USD to the nano-dollar, not 0.0003629999999930078
            body["used"] = round(body["used"], 9)
        if state["used"] > check.cap:  # a soft limit, or commits, went past the cap
            body["used"] = units_shown(body["metric"], state["used"])
        if state.get("reset_ms") is not None:
            body["reset_seconds"] = max(0, math.ceil((state["reset_ms"] - state["now_ms"]) / 1000))
        rows.append(body)
    return rows


def _check_not_lost(plan: Plan) -> None:
    """A store that lost its data reads zero used everywhere until it is rebuilt: say so as
    a decision would (see plan_check in quotas/lua/lib.lua), rather than report every limit
    as full."""
    if plan.version > 0 and config_version_read() is None:
        store_lost()
        raise STORE_LOST.error()


def feature_usage(*, key: KeyInfo, slug: str) -> dict[str, Any]:
    plan = plans.fresh()  # a read carries no version for the engine to check
    key_recheck(plan, key)
    feature = plan.features.get((key.tenant_id, slug))
    if feature is None:
        raise not_found(f"feature '{slug}'")
    if key.feature_ids and feature.id not in key.feature_ids:
        raise QuotaError("forbidden", f"This API key may not act for feature '{slug}'.")
    try:
        _check_not_lost(plan)
        rows = limits_read(plan, plan.feature_limits(feature))
    except STORE_UNREACHABLE as exc:
        raise STORE_DOWN.error() from exc
    return {
        "feature": feature.slug,
        "status": feature.status,
        "priority": feature.priority,
        "limits": rows,
    }
