"""Reading the plan from the database, and the process's cached copy of it."""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from datetime import datetime
from decimal import Decimal

import redis
from django.utils import timezone

from providers.models import LanguageModel, Pool
from quotas.models import ApiKey, Limit
from quotas.plan.compiled import Plan
from quotas.plan.infos import FeatureInfo, KeyInfo, LimitInfo, ModelInfo, PoolInfo, TenantInfo
from quotas.store import config_version_read
from quotas.validation import limit_describe
from tenants.models import Feature, Tenant

RECHECK_SECONDS = 10.0
MAX_AGE_SECONDS = 300.0


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
    now = timezone.now()
    rows = list(Limit.objects.select_related("tenant", "feature", "pool", "model"))
    limits = {limit.id: _limit_info(limit, tenants, now) for limit in rows}
    boosts_end = [r.boost_until for r in rows if r.boost_until and r.boost_active(now)]
    by_tenant: dict[int | None, list[LimitInfo]] = defaultdict(list)
    guarantees: dict[int, list[LimitInfo]] = defaultdict(list)
    for info in limits.values():
        by_tenant[info.tenant_id].append(info)
        if info.guaranteed is not None and info.pool_id is not None:
            guarantees[info.pool_id].append(info)
    return Plan(
        version,
        tenants,
        features,
        pools,
        limits,
        _keys(),
        dict(by_tenant),
        dict(guarantees),
        valid_until=min(boosts_end).timestamp() if boosts_end else math.inf,
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


def _limit_info(limit: Limit, tenants: dict[int, TenantInfo], now: datetime) -> LimitInfo:
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
        limit.amount_at(now),
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
    """The process's plan, reloaded when Redis says it is stale or when a limit boost in it
    ends; as safety nets, when the stored version moved and nobody noticed for
    RECHECK_SECONDS, and in any case after MAX_AGE_SECONDS, since a version bump lost to a
    Redis blip would otherwise never show."""

    def __init__(self) -> None:
        self._plan: Plan | None = None
        self._lock = threading.Lock()

    def get(self) -> Plan:
        plan = self._plan
        if plan is None:
            return self.reload(older_than=None)
        if time.monotonic() - plan.loaded_at > MAX_AGE_SECONDS or time.time() >= plan.valid_until:
            return self.reload(older_than=plan)
        if time.monotonic() - plan.checked_at > RECHECK_SECONDS:
            if _version_or_unknown() != plan.version:
                return self.reload(older_than=plan)
            plan.checked_at = time.monotonic()
        return plan

    def fresh(self) -> Plan:
        """The plan as the database holds it now, for pages that show what was just saved:
        one read of the stored version, and a reload if it moved."""
        plan = self.get()
        if _version_or_unknown() != plan.version:
            return self.reload(older_than=plan)
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
