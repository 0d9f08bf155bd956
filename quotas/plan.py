"""The configuration compiled for the hot path: keys, features, pools and limits in memory.

A `Plan` is read from the database once and kept per process. Every engine call carries the
plan's version; Redis refuses a call made with an older version than the one the last admin
save or `quota apply` wrote, and the process reloads. So a reservation reads no SQL, and a
change takes effect on the next reservation.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

import redis

from providers.models import LanguageModel, Pool
from quotas.engine import Check, PoolOption
from quotas.engine.core import KeySpace
from quotas.engine.periods import periods_around
from quotas.engine.types import Period
from quotas.models import ApiKey, Limit
from quotas.store import config_version_read
from quotas.validation import limit_describe
from tenants.models import Feature, Priority, Tenant

NANO = Decimal(1_000_000_000)
PRIORITY_RANK = {value: rank for rank, value in enumerate(Priority.values)}
RECHECK_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class TenantInfo:
    id: int
    slug: str
    timezone: str
    status: str


@dataclass(frozen=True, slots=True)
class FeatureInfo:
    id: int
    slug: str
    tenant_id: int
    priority: str
    status: str
    pool_ids: tuple[int, ...]  # empty: any pool serving the model


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: int
    name: str
    input_nusd: Decimal  # nano-USD per token
    cached_input_nusd: Decimal
    output_nusd: Decimal
    chars_per_token: float
    context_window: int | None

    def cost_nusd(self, input_tokens: int, cached_input_tokens: int, output_tokens: int) -> int:
        fresh = max(0, input_tokens - cached_input_tokens)
        exact = (
            fresh * self.input_nusd
            + cached_input_tokens * self.cached_input_nusd
            + output_tokens * self.output_nusd
        )
        return int(exact.to_integral_value(rounding="ROUND_CEILING"))


@dataclass(frozen=True, slots=True)
class PoolInfo:
    id: int
    slug: str
    fail_mode: str
    protect: dict[str, float]
    models: dict[str, ModelInfo]  # served models by name

    def protected_share_above(self, priority: str) -> float:
        """Share of per-minute capacity kept for classes more important than `priority`."""
        rank = PRIORITY_RANK[priority]
        return sum(s for cls, s in self.protect.items() if PRIORITY_RANK[cls] < rank)


@dataclass(frozen=True, slots=True)
class LimitInfo:
    id: int
    name: str
    metric: str
    window: str
    amount: Decimal | None
    guaranteed: Decimal | None
    enforcement: str
    tenant_id: int | None
    feature_id: int | None
    pool_id: int | None
    model_id: int | None
    timezone: str
    scope: dict[str, str]

    @property
    def is_pool_capacity(self) -> bool:
        return self.pool_id is not None and not (self.tenant_id or self.feature_id or self.model_id)

    @property
    def guaranteed_units(self) -> int:
        return 0 if self.guaranteed is None else self.units(self.guaranteed)

    def units(self, value: Decimal) -> int:
        """Amounts in engine units: tokens, requests, or nano-USD."""
        return int(value * NANO) if self.metric == "cost_usd" else int(value)

    def applies(self, feature: FeatureInfo, pool_id: int, model_id: int) -> bool:
        return (
            self.tenant_id in (None, feature.tenant_id)
            and self.feature_id in (None, feature.id)
            and self.pool_id in (None, pool_id)
            and self.model_id in (None, model_id)
        )


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: int
    prefix: str
    hashed_secret: str
    tenant_id: int
    feature_ids: tuple[int, ...]
    revoked: bool


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
    checked_at: float = field(default_factory=time.monotonic)
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
            compiled.append(PoolOption(pool=pool.slug, checks=checks))
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
        """The check that reads a limit's state (no priority floor: usage, not admission)."""
        if limit.window in ("hour", "day", "month"):
            return self._budget_check(limit, keyspace, now_ms)
        if limit.metric == "concurrent":
            return Check(
                limit.id,
                "c",
                "concurrent",
                limit.units(limit.amount or Decimal(0)),
                key=keyspace.concurrency(limit.id),
            )
        if limit.amount is None:
            return Check(
                limit.id,
                "g",
                limit.metric,
                limit.guaranteed_units,
                key=keyspace.guarantee(limit.id),
            )
        return Check(
            limit.id, "b", limit.metric, limit.units(limit.amount), key=keyspace.bucket(limit.id)
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
            cap = limit.units(limit.amount)
            floor: int = 0
            guards: tuple[tuple[str, int], ...] = ()
            if limit.is_pool_capacity:
                floor = int(cap * pool.protected_share_above(priority))
                guards = tuple(
                    (keyspace.guarantee(g.id), g.guaranteed_units)
                    for g in self.guarantees.get(pool.id, [])
                    if g.metric == limit.metric and g.feature_id != feature.id
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
                )
            )
        return checks


def plan_load() -> Plan:
    """Read the whole configuration. The version is read first: a change that lands while
    loading bumps it again, and the next call reloads."""
    version = _version_or_unknown()
    tenants = {t.id: TenantInfo(t.id, t.slug, t.timezone, t.status) for t in Tenant.objects.all()}
    pool_ids: dict[int, list[int]] = defaultdict(list)
    for feature_id, pool_id in Feature.pools.through.objects.values_list("feature_id", "pool_id"):
        pool_ids[feature_id].append(pool_id)
    features = {
        (f.tenant_id, f.slug): FeatureInfo(
            f.id, f.slug, f.tenant_id, f.priority, f.status, tuple(pool_ids.get(f.id, ()))
        )
        for f in Feature.objects.all()
    }
    models = {m.id: _model_info(m) for m in LanguageModel.objects.all()}
    served: dict[int, dict[str, ModelInfo]] = defaultdict(dict)
    for pool_id, model_id in Pool.served_models.through.objects.values_list(
        "pool_id", "languagemodel_id"
    ):
        served[pool_id][models[model_id].name] = models[model_id]
    pools = [
        PoolInfo(p.id, p.slug, p.fail_mode, dict(p.protect or {}), served.get(p.id, {}))
        for p in Pool.objects.order_by("position", "slug")
    ]
    limits = {
        limit.id: _limit_info(limit, tenants)
        for limit in Limit.objects.select_related("tenant", "feature", "pool", "model")
    }
    by_tenant: dict[int | None, list[LimitInfo]] = defaultdict(list)
    guarantees: dict[int, list[LimitInfo]] = defaultdict(list)
    for info in limits.values():
        by_tenant[info.tenant_id].append(info)
        if info.guaranteed is not None and info.pool_id is not None:
            guarantees[info.pool_id].append(info)
    return Plan(
        version, tenants, features, pools, limits, _keys(), dict(by_tenant), dict(guarantees)
    )


def _version_or_unknown() -> int:
    """With the store down the plan still loads (fail-open pools need it); version -1 never
    matches, so the first call once the store is back reloads."""
    try:
        return config_version_read()
    except redis.RedisError:
        return -1


def _model_info(m: LanguageModel) -> ModelInfo:
    per_token = Decimal(1000)  # $/Mtok is 1,000 nano-USD per token
    cached = m.cached_input_per_mtok if m.cached_input_per_mtok is not None else m.input_per_mtok
    return ModelInfo(
        m.id,
        m.name,
        m.input_per_mtok * per_token,
        cached * per_token,
        m.output_per_mtok * per_token,
        float(m.chars_per_token),
        m.context_window,
    )


def _limit_info(limit: Limit, tenants: dict[int, TenantInfo]) -> LimitInfo:
    scope = {}
    if limit.tenant is not None:
        scope["tenant"] = limit.tenant.slug
    if limit.feature is not None:
        scope["feature"] = limit.feature.slug
    if limit.pool is not None:
        scope["pool"] = limit.pool.slug
    if limit.model is not None:
        scope["model"] = limit.model.name
    timezone = tenants[limit.tenant_id].timezone if limit.tenant_id else "UTC"
    return LimitInfo(
        limit.id,
        limit_describe(limit),
        limit.metric,
        limit.window,
        limit.amount,
        limit.guaranteed,
        limit.enforcement,
        limit.tenant_id,
        limit.feature_id,
        limit.pool_id,
        limit.model_id,
        timezone,
        scope,
    )


def _keys() -> dict[str, KeyInfo]:
    features: dict[int, list[int]] = defaultdict(list)
    for key_id, feature_id in ApiKey.features.through.objects.values_list(
        "apikey_id", "feature_id"
    ):
        features[key_id].append(feature_id)
    return {
        k.prefix: KeyInfo(
            k.id,
            k.prefix,
            k.hashed_secret,
            k.tenant_id,
            tuple(features.get(k.id, ())),
            k.revoked_at is not None,
        )
        for k in ApiKey.objects.all()
    }


class PlanCache:
    """The process's plan, reloaded when Redis says it is stale (and, as a safety net, when
    the stored version moved and nobody noticed for RECHECK_SECONDS)."""

    def __init__(self) -> None:
        self._plan: Plan | None = None
        self._lock = threading.Lock()

    def get(self) -> Plan:
        plan = self._plan
        if plan is None:
            return self.reload(older_than=None)
        if time.monotonic() - plan.checked_at > RECHECK_SECONDS:
            if _version_or_unknown() != plan.version:
                return self.reload(older_than=plan)
            plan.checked_at = time.monotonic()
        return plan

    def reload(self, *, older_than: Plan | None = None) -> Plan:
        with self._lock:
            if self._plan is not older_than and self._plan is not None:
                return self._plan  # another thread reloaded meanwhile
            self._plan = plan_load()
            return self._plan

    def clear(self) -> None:
        self._plan = None


plans = PlanCache()
