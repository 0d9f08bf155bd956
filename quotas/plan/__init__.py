"""The configuration compiled for the hot path: keys, features, pools and limits in memory.

A `Plan` is read from the database once and kept per process. Every engine call carries the
plan's version; Redis refuses a call made with an older version than the one the last admin
save or `quota apply` wrote, and the process reloads. So a reservation reads no SQL, and a
change takes effect on the next reservation.
"""

from __future__ import annotations

from quotas.plan.compiled import Plan, features_by_id, pool_by_id
from quotas.plan.infos import (
    NANO,
    PRIORITY_RANK,
    FeatureInfo,
    KeyInfo,
    LimitInfo,
    ModelInfo,
    PoolInfo,
    TenantInfo,
)
from quotas.plan.load import PlanCache, plan_load, plans

__all__ = [
    "NANO",
    "PRIORITY_RANK",
    "FeatureInfo",
    "KeyInfo",
    "LimitInfo",
    "ModelInfo",
    "Plan",
    "PlanCache",
    "PoolInfo",
    "TenantInfo",
    "features_by_id",
    "plan_load",
    "plans",
    "pool_by_id",
]
