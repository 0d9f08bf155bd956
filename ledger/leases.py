"""Held reservations as leases again, for `quota rebuild` after Redis lost them.

The lease is what reserve.lua would have written, rebuilt from the ledger row and the current
configuration: the same limits (by scope), what it reserved in each, the model's current
prices. It is held until the expiry it was granted, or a short while from the rebuild when that
is later, after which the reaper expires it like any other, charged as reserved; a caller that
commits later is still accepted, as a commit after expiry.
"""

from __future__ import annotations

import json
from typing import Any

from ledger.budgets import row_amount
from ledger.events import Row
from quotas.engine.core import KeySpace
from quotas.engine.types import LeaseRestore
from quotas.keys import lease_digest
from quotas.plan import FeatureInfo, Plan, PoolInfo, pool_by_id


def lease_for_row(
    row: Row,
    *,
    plan: Plan,
    features: dict[int, FeatureInfo],
    keyspace: KeySpace,
    expires_ms: int,
) -> LeaseRestore | None:
    """None when the configuration no longer knows the feature, pool or model. `features`:
    the plan's by id (`features_by_id`)."""
    feature = features.get(row["feature_pk"])
    pool = pool_by_id(plan, row["pool_pk"])
    model = pool.models.get(row["model"]) if pool else None
    if feature is None or pool is None or model is None or row["created_ms"] is None:
        return None
    checks = _checks(row, plan, keyspace, feature, pool)
    lease: dict[str, Any] = {
        "id": row["rid"],
        "st": "held",
        "tenant": feature.tenant_id,
        "feature": feature.id,
        "pool": pool.slug,
        "created": row["created_ms"],
        "e": expires_ms,
        "ck": checks,
        "soft": [int(i) for i in row["would_refuse"].split(",") if i.isdigit()],
        "r": {
            "in_": row["reserved_input_tokens"] or 0,
            "out": row["reserved_output_tokens"] or 0,
            "cost": row["reserved_cost_nusd"] or 0,
        },
        "meta": _meta(row),
        "ttl_ms": max(1, expires_ms - row["created_ms"]),
        "prices": {
            "i": float(model.input_nusd),
            "c": float(model.cached_input_nusd),
            "o": float(model.output_nusd),
        },
    }
    key = plan.keys.get(row["api_key"])
    if key is not None:  # the key's digest, as reserve.lua records it (see quotas.keys)
        lease["kd"] = lease_digest(key.hashed_secret)
    slots = tuple(check["k"] for check in checks if check["kind"] == "c")
    return LeaseRestore(row["rid"], lease, expires_ms, slots)


def _checks(
    row: Row, plan: Plan, keyspace: KeySpace, feature: FeatureInfo, pool: PoolInfo
) -> list[dict[str, Any]]:
    model_id = pool.models[row["model"]].id
    candidates = plan.by_tenant.get(feature.tenant_id, []) + plan.by_tenant.get(None, [])
    checks = []
    for limit in candidates:
        if not limit.applies(feature, pool.id, model_id):
            continue
        check = plan.inspection_check(limit, keyspace, row["created_ms"])
        # the period the reservation was made in, as reserve.lua recorded it
        key = check.periods[1].key if check.kind == "p" else check.key
        amount = 1 if check.kind == "c" else row_amount(row, check.metric)
        entry = {"k": key, "kind": check.kind, "m": check.metric, "cap": check.cap, "amt": amount}
        if check.kind == "g":
            entry["took"] = 0  # a guarantee refill is not worth rebuilding
        checks.append(entry)
    return checks


def _meta(row: Row) -> dict[str, Any]:
    meta = {
        "tenant": row["tenant"],
        "feature": row["feature"],
        "model": row["model"],
        "priority": row["priority"],
        "key": row["api_key"],
        "estimated": int(row["estimated"]),
        "pool": row["pool"],
    }
    if row["metadata"]:
        metadata = row["metadata"]
        meta["metadata"] = metadata if isinstance(metadata, str) else json.dumps(metadata)
    return meta
