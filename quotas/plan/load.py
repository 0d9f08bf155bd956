"""Reading the plan from the database, and the process's cached copy of it."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from typing import NamedTuple

import redis
from django.db import DatabaseError
from django.utils import timezone

from providers.backpressure import Backpressure
from providers.models import LanguageModel, Pool
from quotas.metrics import PLAN_RELOADS
from quotas.models import ApiKey, ConfigVersion, Limit, amount_at, boost_active
from quotas.plan.compiled import Plan
from quotas.plan.infos import FeatureInfo, KeyInfo, LimitInfo, ModelInfo, PoolInfo, TenantInfo
from quotas.store import config_version_read
from quotas.validation import limit_words, scope_words
from tenants.models import Feature, Tenant

log = logging.getLogger(__name__)

RECHECK_SECONDS = 10.0
STORED_RECHECK_SECONDS = 60.0


def plan_load() -> Plan:
    """Read the whole configuration. The versions are read first: a change that lands while
    loading bumps them again, and the next call reloads."""
    version = _version_or_unknown()
    stored_version = ConfigVersion.read()
    if version is None:
        # A store without a version whose database has one lost its data: the plan takes the
        # database's, so that every script it calls says so (plan_check in quotas/lua/lib.lua).
        version = stored_version
    tenants = {t.id: TenantInfo(t.id, t.slug, t.timezone, t.status) for t in Tenant.objects.all()}
    pool_ids: dict[int, list[int]] = defaultdict(list)
    for feature_id, pool_id in Feature.pools.through.objects.values_list("feature_id", "pool_id"):
        pool_ids[feature_id].append(pool_id)
    # rows rather than model instances: a plan may hold 100,000 features and their limits
    features = {
        (tenant_id, slug): FeatureInfo(
            feature_id, slug, tenant_id, priority, status, tuple(pool_ids.get(feature_id, ()))
        )
        for feature_id, slug, tenant_id, priority, status in Feature.objects.values_list(
            "id", "slug", "tenant_id", "priority", "status"
        )
    }
    models = {m.id: _model_info(m) for m in LanguageModel.objects.all()}
    served: dict[int, dict[str, ModelInfo]] = defaultdict(dict)
    for pool_id, model_id in Pool.served_models.through.objects.values_list(
        "pool_id", "languagemodel_id"
    ):
        served[pool_id][models[model_id].name] = models[model_id]
    pools = [
        PoolInfo(
            p.id,
            p.slug,
            p.fail_mode,
            dict(p.protect or {}),
            served.get(p.id, {}),
            float(p.line_minutes),
            Backpressure.of(p.backpressure),
        )
        for p in Pool.objects.order_by("position", "slug")
    ]
    now = timezone.now()
    rows = [LimitRow(*values) for values in Limit.objects.values_list(*LimitRow._fields)]
    limits = {row.id: _limit_info(row, tenants, now) for row in rows}
    boosts_end = [
        r.boost_until
        for r in rows
        if r.boost_until and boost_active(r.boost_amount, r.boost_until, now)
    ]
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
        stored_version=stored_version,
    )


def _version_or_unknown() -> int | None:
    """With the store down the plan still loads (fail-open pools need it); version -1 never
    matches, so the first call once the store is back reloads. None: the store has none."""
    try:
        return config_version_read()
    except redis.RedisError:
        return -1


def _version_moved(plan: Plan) -> bool:
    """Whether the store's version is not the plan's; a store without one is at the
    database's version the plan was loaded with (see plan_load)."""
    version = _version_or_unknown()
    if version == -1:
        # unreadable (the home partition's shard failing over): nothing says the plan moved,
        # and a plan reloaded now would carry -1, which every partition answers as stale
        return False
    return (plan.stored_version if version is None else version) != plan.version


def _stored_version_or(known: int) -> int:
    """With the database down the plan in hand stays (reloading it would fail anyway), and
    the next check is a minute later."""
    try:
        return ConfigVersion.read()
    except DatabaseError:
        log.warning("could not read the config version from the database", exc_info=True)
        return known


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


class LimitRow(NamedTuple):
    """What the plan reads of a limit, its scope's names joined in (one query)."""

    id: int
    metric: str
    window: str
    amount: Decimal | None
    guaranteed: Decimal | None
    enforcement: str
    boost_amount: Decimal | None
    boost_until: datetime | None
    burst: Decimal | None
    tenant_id: int | None
    feature_id: int | None
    pool_id: int | None
    model_id: int | None
    tenant__slug: str | None
    feature__slug: str | None
    pool__slug: str | None
    model__name: str | None


def _limit_info(row: LimitRow, tenants: dict[int, TenantInfo], now: datetime) -> LimitInfo:
    names = {
        "tenant": row.tenant__slug,
        "feature": row.feature__slug,
        "pool": row.pool__slug,
        "model": row.model__name,
    }
    scope = {part: name for part, name in names.items() if name is not None}
    timezone = tenants[row.tenant_id].timezone if row.tenant_id else "UTC"
    return LimitInfo(
        row.id,
        limit_words(
            scope_words(row.tenant__slug, row.feature__slug, row.pool__slug, row.model__name),
            row.metric,
            row.window,
            row.amount,
            row.guaranteed,
            row.enforcement,
        ),
        row.metric,
        row.window,
        amount_at(row.amount, row.boost_amount, row.boost_until, now),
        row.guaranteed,
        row.enforcement,
        row.tenant_id,
        row.feature_id,
        row.pool_id,
        row.model_id,
        timezone,
        scope,
        row.burst,
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
    ends; as safety nets, when the version in Redis moved and nobody noticed for
    RECHECK_SECONDS, and when the version in the database moved (checked every
    STORED_RECHECK_SECONDS), since a bump of the Redis copy lost to a Redis blip would
    otherwise never show."""

    def __init__(self) -> None:
        self._plan: Plan | None = None
        self._lock = threading.Lock()

    def get(self) -> Plan:
        plan = self._plan
        if plan is None or time.time() >= plan.valid_until:
            return self.reload(older_than=plan)
        now = time.monotonic()
        if now - plan.checked_at > RECHECK_SECONDS:
            if _version_moved(plan):
                return self.reload(older_than=plan)
            plan.checked_at = now
        if now - plan.stored_checked_at > STORED_RECHECK_SECONDS:
            plan.stored_checked_at = now  # first: one request a minute asks, not all at once
            if _stored_version_or(plan.stored_version) != plan.stored_version:
                return self.reload(older_than=plan)
        return plan

    def fresh(self) -> Plan:
        """The plan as the database holds it now, for pages that show what was just saved:
        one read of the version in Redis, and a reload if it moved."""
        plan = self.get()
        if _version_moved(plan):
            return self.reload(older_than=plan)
        return plan

    def reload(self, *, older_than: Plan | None = None) -> Plan:
        with self._lock:
            if self._plan is not older_than and self._plan is not None:
                return self._plan  # another thread reloaded meanwhile
            try:
                self._plan = plan_load()
            except Exception:
                PLAN_RELOADS.labels("failed").inc()
                raise
            PLAN_RELOADS.labels("loaded").inc()
            return self._plan

    def in_hand(self) -> Plan | None:
        """The plan this process holds, never loading one (for the access log)."""
        return self._plan

    def clear(self) -> None:
        self._plan = None


plans = PlanCache()
