"""A compiled plan: which checks a reservation of a feature on a pool must pass."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from decimal import Decimal

from quotas.engine import Check, PoolOption, Pressure
from quotas.engine.core import KeySpace
from quotas.engine.partitions import tenant_partition
from quotas.engine.periods import periods_around
from quotas.engine.types import Period
from quotas.plan.infos import (
    FeatureInfo,
    KeyInfo,
    LimitInfo,
    ModelInfo,
    PoolInfo,
    TenantInfo,
)


@dataclass(slots=True)
class Plan:
    version: int
    tenants: dict[int, TenantInfo]
    features: dict[tuple[int, str], FeatureInfo]
    pools: list[PoolInfo]  # in the order to try
    limits: dict[int, LimitInfo]
    keys: dict[str, KeyInfo]
    by_tenant: dict[int | None, list[LimitInfo]]
    guarantees: dict[int, list[LimitInfo]]  # by pool
    valid_until: float = math.inf  # epoch seconds: a limit boost ends, so the caps change
    stored_version: int = 0  # ConfigVersion in the database when the load began
    checked_at: float = field(default_factory=time.monotonic)  # the version in Redis
    stored_checked_at: float = field(default_factory=time.monotonic)
    _options: dict[tuple[object, ...], tuple[tuple[PoolOption, ...], int]] = field(
        default_factory=dict
    )

    def candidate_pools(self, feature: FeatureInfo, model: str, pool: str | None) -> list[PoolInfo]:
        allowed = set(feature.pool_ids)
        return [
            p
            for p in self.pools
            if model in p.models
            and (not allowed or p.id in allowed)
            and (pool is None or p.slug == pool)
        ]

    def options(
        self,
        feature: FeatureInfo,
        pools: list[PoolInfo],
        model: str,
        priority: str,
        keyspace: KeySpace,
        now_ms: int,
    ) -> tuple[PoolOption, ...]:
        """The checks of every candidate pool, compiled once and kept until a period ends."""
        memo_key = (feature.id, tuple(p.id for p in pools), model, priority, keyspace.prefix)
        memo = self._options.get(memo_key)
        if memo is not None and now_ms < memo[1]:
            return memo[0]
        compiled, valid_until = [], 2**62
        for pool in pools:
            checks, until = self._checks(
                feature, pool, pool.models[model], priority, keyspace, now_ms
            )
            compiled.append(
                PoolOption(pool=pool.slug, checks=checks, pressure=pressure_of(pool, keyspace))
            )
            valid_until = min(valid_until, until)
        result = tuple(compiled)
        self._options[memo_key] = (result, valid_until)
        return result

    def _checks(
        self,
        feature: FeatureInfo,
        pool: PoolInfo,
        model: ModelInfo,
        priority: str,
        keyspace: KeySpace,
        now_ms: int,
    ) -> tuple[tuple[Check, ...], int]:
        checks: list[Check] = []
        valid_until = 2**62
        candidates = self.by_tenant.get(feature.tenant_id, []) + self.by_tenant.get(None, [])
        for limit in candidates:
            if not limit.applies(feature, pool.id, model.id):
                continue
            if limit.window in ("hour", "day", "month"):
                check = self._budget_check(limit, keyspace, now_ms)
                valid_until = min(valid_until, check.periods[1].stop_ms)
                checks.append(check)
            else:
                checks.extend(self._minute_checks(limit, feature, pool, priority, keyspace))
        return tuple(checks), valid_until

    def tenant_of(self, limit: LimitInfo) -> int | None:
        """The tenant whose partition holds a limit (its feature's, for a feature's limit);
        None for a limit that tenants share."""
        if limit.tenant_id is None and limit.feature_id is not None:
            return features_by_id(self)[limit.feature_id].tenant_id
        return limit.tenant_id

    def _on_partition(self, limit: LimitInfo, keyspace: KeySpace) -> bool:
        """Whether a tenant's or a feature's limit lives on the partition of `keyspace`."""
        if keyspace.count == 1:
            return True
        tenant = self.tenant_of(limit)
        return tenant is not None and tenant_partition(tenant, keyspace.count) == keyspace.index

    def feature_limits(self, feature: FeatureInfo) -> list[LimitInfo]:
        """Every limit that can apply to a feature's reservations, whatever the model."""
        allowed = set(feature.pool_ids) or {p.id for p in self.pools}
        candidates = self.by_tenant.get(feature.tenant_id, []) + self.by_tenant.get(None, [])
        return [
            limit
            for limit in candidates
            if limit.feature_id in (None, feature.id)
            and (limit.pool_id is None or limit.pool_id in allowed)
        ]

    def inspection_check(self, limit: LimitInfo, keyspace: KeySpace, now_ms: int) -> Check:
        """The check that reads a limit's state (no priority floor: usage, not admission), on
        one partition: of a split limit, that partition's allotment (`split_limit`)."""
        if limit.window in ("hour", "day", "month"):
            return self._budget_check(limit, keyspace, now_ms)
        split = split_limit(limit, keyspace)
        if limit.metric == "concurrent":
            return Check(
                limit.id,
                "c",
                "concurrent",
                limit.units(limit.amount or Decimal(0)),
                key=keyspace.concurrency(limit.id),
                split=split,
            )
        if limit.amount is None:
            return Check(
                limit.id,
                "g",
                limit.metric,
                limit.guaranteed_units,
                key=keyspace.guarantee(limit.id),
            )
        rate = limit.units(limit.amount)
        depth = rate if limit.burst is None else min(rate, limit.units(limit.burst))
        return Check(
            limit.id,
            "b",
            limit.metric,
            depth,
            key=keyspace.bucket(limit.id),
            rate=rate if depth != rate else 0,
            split=split,
        )

    @staticmethod
    def _budget_check(limit: LimitInfo, keyspace: KeySpace, now_ms: int) -> Check:
        prev, start, stop, after = periods_around(limit.timezone, limit.window, now_ms)
        assert limit.amount is not None
        periods = (
            Period(keyspace.period(limit.id, prev), prev, start),
            Period(keyspace.period(limit.id, start), start, stop),
            Period(keyspace.period(limit.id, stop), stop, after),
        )
        return Check(
            limit.id,
            "p",
            limit.metric,
            limit.units(limit.amount),
            enforcement=limit.enforcement,
            periods=periods,
            split=split_limit(limit, keyspace),
        )

    def _minute_checks(
        self,
        limit: LimitInfo,
        feature: FeatureInfo,
        pool: PoolInfo,
        priority: str,
        keyspace: KeySpace,
    ) -> list[Check]:
        enforcement = limit.enforcement
        split = split_limit(limit, keyspace)
        if limit.metric == "concurrent":
            assert limit.amount is not None
            return [
                Check(
                    limit.id,
                    "c",
                    "concurrent",
                    limit.units(limit.amount),
                    enforcement=enforcement,
                    key=keyspace.concurrency(limit.id),
                    split=split,
                )
            ]
        checks = []
        if limit.guaranteed is not None:
            checks.append(
                Check(
                    limit.id,
                    "g",
                    limit.metric,
                    limit.guaranteed_units,
                    key=keyspace.guarantee(limit.id),
                )
            )
        if limit.amount is not None:
            # a burst is the bucket's depth (its cap); it refills at the amount (its rate)
            rate = limit.units(limit.amount)
            cap = rate if limit.burst is None else min(rate, limit.units(limit.burst))
            floor: int = 0
            guards: tuple[tuple[str, int], ...] = ()
            if limit.is_shared_pool_limit:  # the pool's own, for all models or for one
                floor = int(cap * pool.protected_share_above(priority))
            if limit.is_pool_capacity:  # guarantees are shares of the pool's capacity
                # of this partition's: a guarantee elsewhere is kept by its own allotment
                guards = tuple(
                    (keyspace.guarantee(g.id), g.guaranteed_units)
                    for g in self.guarantees.get(pool.id, [])
                    if g.metric == limit.metric
                    and g.feature_id != feature.id
                    and self._on_partition(g, keyspace)
                )
            checks.append(
                Check(
                    limit.id,
                    "b",
                    limit.metric,
                    cap,
                    enforcement=enforcement,
                    key=keyspace.bucket(limit.id),
                    floor=floor,
                    guards=guards,
                    line=int(rate * pool.line_minutes),  # minutes of the refill
                    pool_limit=limit.is_shared_pool_limit,
                    rate=rate if cap != rate else 0,
                    split=split,
                )
            )
        return checks


_by_id: tuple[Plan | None, dict[int, FeatureInfo]] = (None, {})


def features_by_id(plan: Plan) -> dict[int, FeatureInfo]:
    """The plan's features by id, for the few callers that hold an id rather than a slug
    (degraded settlements, lease rebuilds); made once per plan and kept for the latest."""
    global _by_id
    kept, index = _by_id
    if kept is not plan:
        index = {feature.id: feature for feature in plan.features.values()}
        _by_id = (plan, index)
    return index


def split_limit(limit: LimitInfo, keyspace: KeySpace) -> bool:
    """Whether tenants of several partitions share a limit: one with no tenant (a pool's own,
    or every tenant's), on a partitioned store. Each partition holds an allotment of it."""
    return keyspace.count > 1 and limit.tenant_id is None and limit.feature_id is None


def pressure_of(pool: PoolInfo, keyspace: KeySpace) -> Pressure:
    """A pool's backpressure settings as the engine takes them."""
    bp = pool.backpressure
    return Pressure(
        key=keyspace.pressure(pool.id),
        adaptive=bp.adaptive,
        floor=bp.floor,
        decrease=bp.decrease,
        cooldown_ms=int(bp.cooldown_seconds * 1000),
        recovery_ms=int(bp.recovery_seconds * 1000),
        window_ms=int(bp.breaker_window_seconds * 1000) if bp.breaker else 0,
        min_calls=int(bp.breaker_min_calls),
        failure_ratio=bp.breaker_failure_ratio,
        open_ms=int(bp.breaker_open_seconds * 1000),
    )


def pool_by_id(plan: Plan, pool_id: int | None) -> PoolInfo | None:
    return next((pool for pool in plan.pools if pool.id == pool_id), None)
