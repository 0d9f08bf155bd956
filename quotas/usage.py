"""Reads of live usage, for the API's usage endpoint and the admin's pages."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from quotas.engine import Check
from quotas.engine.core import KeySpace
from quotas.engine.partitions import tenant_partition
from quotas.errors import QuotaError, not_found
from quotas.plan import KeyInfo, LimitInfo, Plan, plans
from quotas.recovery import store_lost
from quotas.refusals import limit_body, units_shown
from quotas.reservations import STORE_DOWN, STORE_LOST, get_engine, key_recheck
from quotas.store import STORE_UNREACHABLE, config_version_read

CHUNK = 2_000  # limits per script call: a long script would hold up every reservation


def limit_states(
    plan: Plan, limits: Iterable[LimitInfo], *, now_ms: int | None = None
) -> list[tuple[Check, dict[str, Any]]]:
    """Each limit's state now as the engine counts it: its check (the whole amount as `cap`)
    and {used, remaining, reset_ms, now_ms} in engine units, one script call per CHUNK limits
    of a partition. A tenant's or a feature's limit is read on the tenant's partition; a
    limit split across partitions (quotas/allotments.py) on each of them, and summed: used
    and remaining added up, the latest reset. Raises one of STORE_UNREACHABLE when the store
    is down."""
    engine = get_engine()
    now_ms = engine.now_ms_estimate() if now_ms is None else now_ms
    infos = list(limits)
    # the partitions each limit is read on, and its check on each
    wanted: dict[int, list[tuple[int, Check]]] = {}
    for position, info in enumerate(infos):
        for space in _spaces_of(plan, info, engine.spaces):
            check = plan.inspection_check(info, space, now_ms)
            wanted.setdefault(space.index, []).append((position, check))
    read: list[list[dict[str, Any]]] = [[] for _ in infos]
    checks: list[Check | None] = [None] * len(infos)
    for index, pairs in wanted.items():
        space = engine.spaces[index]
        for start in range(0, len(pairs), CHUNK):
            chunk = pairs[start : start + CHUNK]
            states = engine.inspect([check for _, check in chunk], space=space)
            for (position, check), state in zip(chunk, states, strict=True):
                read[position].append(state)
                if checks[position] is None:
                    checks[position] = check
    result = []
    for first, states in zip(checks, read, strict=True):
        assert first is not None
        resets = [s["reset_ms"] for s in states if s.get("reset_ms") is not None]
        result.append(
            (
                first,
                {
                    "id": first.limit_id,
                    "used": sum(s["used"] for s in states),
                    "remaining": sum(s["remaining"] for s in states),
                    "reset_ms": max(resets) if resets else None,
                    "now_ms": max(int(s["now_ms"]) for s in states),
                },
            )
        )
    return result


def _spaces_of(plan: Plan, info: LimitInfo, spaces: tuple[KeySpace, ...]) -> tuple[KeySpace, ...]:
    """The partitions that hold a limit's state: the tenant's for a tenant's or a feature's
    limit, every one for a limit that tenants share."""
    if len(spaces) == 1:
        return spaces
    tenant = plan.tenant_of(info)
    if tenant is None:
        return spaces
    return (spaces[tenant_partition(tenant, len(spaces))],)


def limits_read(plan: Plan, limits: Iterable[LimitInfo]) -> list[dict[str, Any]]:
    """Each limit's state now (`limit_states`), as the API shows a limit (id, name, scope,
    metric, window, enforcement, limit, remaining) plus `used` and `reset_seconds` (when the
    bucket is full again, or the budget's period ends). Raises one of STORE_UNREACHABLE when
    the store is down."""
    rows = []
    for check, state in limit_states(plan, limits):
        body = limit_body(plan, check.limit_id, check.cap, state["remaining"], None)
        body["used"] = body["limit"] - body["remaining"]
        if body["metric"] == "cost_usd":  # USD to the nano-dollar, not 0.0003629999999930078
            body["used"] = round(body["used"], 9)
        # a split limit's allotments may add up to less than its amount (whole units, or a
        # rebalancing under way): what is used is their sum, not what the others leave
        if state["used"] > check.cap or check.split:  # or a soft limit went past the cap
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
