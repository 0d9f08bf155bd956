"""Reservation services: the hot path. Each call is plan lookups in memory and one EVALSHA."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import DatabaseError

from quotas.degraded import (
    Subject,
    degraded_admit,
    degraded_lease,
    degraded_settle,
    drain_in_background,
    is_degraded_id,
    spool_drain,
    spool_size,
)
from quotas.engine import (
    Conflict,
    Existing,
    Granted,
    KeyHolder,
    LeaseView,
    Lost,
    Missing,
    Owner,
    Refused,
    Report,
    ReserveCall,
    Settled,
    Stale,
    Unavailable,
    Usage,
)
from quotas.engine.core import KeySpace
from quotas.errors import QuotaError, database_unavailable, invalid, not_found
from quotas.estimate import estimate_tokens
from quotas.keys import lease_digest
from quotas.metrics import DEGRADED_GRANTS, RESERVATIONS
from quotas.plan import PRIORITY_RANK, FeatureInfo, KeyInfo, Plan, PoolInfo, plans
from quotas.plan.compiled import pressure_of
from quotas.recovery import lease_restore, store_lost
from quotas.refusals import refusal_error, upstream_error
from quotas.store import STORE_UNREACHABLE, each_answering, get_engine
from quotas.upstream_headers import provider_limits

log = logging.getLogger(__name__)
STALE_RETRIES = 3


@dataclass(frozen=True, slots=True)
class ReserveInput:
    feature: str
    model: str
    max_output_tokens: int
    input_tokens: int | None = None
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    min_output_tokens: int | None = None
    priority: str | None = None
    pool: str | None = None
    ttl_seconds: int = 60
    idempotency_key: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    body_hash: str = ""
    max_wait_ms: int = 0


@dataclass(frozen=True, slots=True)
class CommitInput:
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    finish_reason: str = ""
    upstream_status: int | None = None
    latency_ms: int | None = None
    upstream_headers: dict[str, Any] | None = None
    body_hash: str = ""


@dataclass(frozen=True, slots=True)
class ReleaseInput:
    """A release may say why the call did not happen: a provider 429 is reported so."""

    upstream_status: int | None = None
    latency_ms: int | None = None
    upstream_headers: dict[str, Any] | None = None


def upstream_report(
    status: int | None, headers: dict[str, Any] | None
) -> tuple[Report | None, dict[str, str]]:
    """The provider's answer for the engine (its status, the limits its headers state), and
    the event fields it adds; no report when the caller said nothing of it."""
    if status is None and not headers:
        return None, {}
    limits = provider_limits(headers).for_engine() if headers else {}
    extra = {} if status is None else {"upstream_status": str(status)}
    return Report(status=status, limits=limits), extra


@dataclass(frozen=True, slots=True)
class Reserved:
    """A granted reservation, with what the plan knows about the limits it touched."""

    granted: Granted
    plan: Plan
    feature: FeatureInfo
    model: str
    priority: str
    input_tokens: int
    estimated: bool
    requested_output_tokens: int


def body_hash(data: dict[str, Any]) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


Caller = KeyInfo | KeyHolder  # the API key, or only its digest when the plan cannot load
EngineCall = Callable[[Owner | KeyHolder, int | None], Any]


def owner_of(key: KeyInfo) -> Owner:
    return Owner(tenant_id=key.tenant_id, feature_ids=key.feature_ids)


def holder_of(key: Caller) -> KeyHolder:
    return key if isinstance(key, KeyHolder) else KeyHolder(lease_digest(key.hashed_secret))


# -- reserve ---------------------------------------------------------------------------------


def reservation_reserve(*, key: KeyInfo, data: ReserveInput) -> Reserved:
    """Reserve the worst case of one LLM call, or raise QuotaError saying why not.

    The same idempotency key and body return the first reservation, answered as the first time.
    """
    reservation_id = get_engine().reservation_id(key.tenant_id)
    for _ in range(STALE_RETRIES):
        plan = plans.get()
        try:
            feature = _feature_for(plan, key, data.feature)
        except QuotaError as error:
            # Decided from the cached plan alone, without the script's version check: a
            # feature resumed or created a moment ago must not be refused for that.
            if plans.fresh() is plan:
                _count_paused(error, plan, key, data.feature)
                raise
            continue
        priority = _priority(feature, data.priority)
        pools = _pools(plan, feature, data)
        input_tokens, estimated = _input_tokens(data, pools[0])
        call = _reserve_call(
            plan, key, feature, pools, data, priority, input_tokens, reservation_id, estimated
        )
        try:
            result = get_engine().reserve(call)
        except STORE_UNREACHABLE as exc:
            log.warning("store unavailable on reserve: %s", exc)
            result = _unenforced(call, pools[0], STORE_DOWN)
        else:
            spool_drain(get_engine())
        if isinstance(result, Lost):
            store_lost()
            result = _unenforced(call, pools[0], STORE_LOST)
        if isinstance(result, Stale):
            key_recheck(plans.reload(older_than=plan), key)
            continue
        return _reserve_outcome(
            result, plan, feature, pools[0], data, priority, input_tokens, estimated
        )
    raise QuotaError(
        "unavailable", "The configuration is changing; try again.", headers={"Retry-After": "1"}
    )


def key_recheck(plan: Plan, key: KeyInfo) -> None:
    """A key authenticated against an older plan may have been revoked since: 401."""
    current = plan.keys.get(key.prefix)
    if current is None or current.revoked:
        raise QuotaError(
            "unauthenticated",
            "This API key was revoked.",
            headers={"WWW-Authenticate": 'Bearer realm="api"'},
        )


def _feature_for(plan: Plan, key: KeyInfo, slug: str) -> FeatureInfo:
    feature = plan.features.get((key.tenant_id, slug))
    if feature is None:
        raise not_found(f"feature '{slug}'")
    if key.feature_ids and feature.id not in key.feature_ids:
        raise QuotaError("forbidden", f"This API key may not act for feature '{slug}'.")
    if feature.status == "paused" or plan.tenants[feature.tenant_id].status != "active":
        raise QuotaError("feature_paused", f"Feature '{slug}' is paused by its owner.")
    return feature


def _priority(feature: FeatureInfo, asked: str | None) -> str:
    if asked is None:
        return feature.priority
    if asked not in PRIORITY_RANK:
        raise invalid({"priority": f"'{asked}' is not one of {', '.join(PRIORITY_RANK)}."})
    if PRIORITY_RANK[asked] < PRIORITY_RANK[feature.priority]:
        raise invalid(
            {
                "priority": f"A request may lower its priority below its feature's "
                f"class ({feature.priority}), never raise it."
            }
        )
    return asked


def _pools(plan: Plan, feature: FeatureInfo, data: ReserveInput) -> list[PoolInfo]:
    pools = plan.candidate_pools(feature, data.model, data.pool)
    if pools:
        return pools
    if not any(data.model in p.models for p in plan.pools):
        raise not_found(f"model '{data.model}'")
    if data.pool is not None:
        raise invalid(
            {
                "pool": f"Pool '{data.pool}' does not serve '{data.model}' for "
                f"feature '{feature.slug}'."
            }
        )
    raise invalid(
        {"model": f"No pool that feature '{feature.slug}' may use serves '{data.model}'."}
    )


def _input_tokens(data: ReserveInput, pool: PoolInfo) -> tuple[int, bool]:
    if data.input_tokens is not None:
        return data.input_tokens, False
    model = pool.models[data.model]
    count = estimate_tokens(
        chars_per_token=model.chars_per_token, prompt=data.prompt, messages=data.messages
    )
    return count, True


def _reserve_call(
    plan: Plan,
    key: KeyInfo,
    feature: FeatureInfo,
    pools: list[PoolInfo],
    data: ReserveInput,
    priority: str,
    input_tokens: int,
    reservation_id: str,
    estimated: bool,
) -> ReserveCall:
    engine = get_engine()
    model = pools[0].models[data.model]
    space = engine.tenant_space(feature.tenant_id)
    options = plan.options(feature, pools, data.model, priority, space, engine.now_ms_estimate())
    tenant = plan.tenants[feature.tenant_id]
    meta = {
        "tenant": tenant.slug,
        "feature": feature.slug,
        "model": data.model,
        "priority": priority,
        "key": key.prefix,
        "estimated": int(estimated),
    }
    if data.metadata:
        meta["metadata"] = json.dumps(data.metadata, separators=(",", ":"))
    return ReserveCall(
        reservation_id=reservation_id,
        version=plan.version,
        tenant_id=feature.tenant_id,
        feature_id=feature.id,
        options=options,
        input_tokens=input_tokens,
        max_output_tokens=data.max_output_tokens,
        min_output_tokens=(
            data.max_output_tokens if data.min_output_tokens is None else data.min_output_tokens
        ),
        cost_fixed=model.cost_nusd(input_tokens, 0, 0),
        cost_per_output=float(model.output_nusd),
        prices=(float(model.input_nusd), float(model.cached_input_nusd), float(model.output_nusd)),
        ttl_ms=data.ttl_seconds * 1000,
        meta=meta,
        idempotency_key=data.idempotency_key or "",
        idempotency_hash=data.body_hash,
        key_digest=lease_digest(key.hashed_secret),
        max_wait_ms=data.max_wait_ms,
    )


def _reserve_outcome(
    result: Granted | Refused | Unavailable | Existing | Conflict,
    plan: Plan,
    feature: FeatureInfo,
    pool: PoolInfo,
    data: ReserveInput,
    priority: str,
    input_tokens: int,
    estimated: bool,
) -> Reserved:
    if isinstance(result, Existing):
        _count("granted", "replay", plan, feature, result.granted.pool)
        result = result.granted  # a replay answers as the first call did
    elif isinstance(result, Granted) and not is_degraded_id(result.reservation_id):
        _count("granted", "would_refuse" if result.would_refuse else "", plan, feature, result.pool)
    if isinstance(result, Granted):
        return Reserved(
            result,
            plan,
            feature,
            data.model,
            priority,
            input_tokens,
            estimated,
            data.max_output_tokens,
        )
    if isinstance(result, Conflict):
        raise QuotaError("conflict", "This idempotency key was used with another request body.")
    if isinstance(result, Unavailable):
        _count("refused", "upstream_unavailable", plan, feature, result.pool)
        raise upstream_error(result)
    _count("refused", result.reason, plan, feature, pool.slug)
    raise refusal_error(result, plan)


def _count(outcome: str, reason: str, plan: Plan, feature: FeatureInfo, pool: str) -> None:
    """One reserve decision, labelled with the plan's own slugs (bounded by the config)."""
    tenant = plan.tenants[feature.tenant_id].slug
    RESERVATIONS.labels(outcome, reason, tenant, feature.slug, pool).inc()


def _count_paused(error: QuotaError, plan: Plan, key: KeyInfo, slug: str) -> None:
    """A refusal of a paused feature is a decision; an unknown or forbidden one is not."""
    feature = plan.features.get((key.tenant_id, slug))
    if error.code == "feature_paused" and feature is not None:
        _count("paused", "", plan, feature, "")


def reservation_commit(*, key: Caller, reservation_id: str, data: CommitInput) -> Settled:
    report, upstream = upstream_report(data.upstream_status, data.upstream_headers)
    extra = {"finish_reason": data.finish_reason, **upstream}
    if data.latency_ms is not None:
        extra["latency_ms"] = str(data.latency_ms)
    usage = Usage(
        input_tokens=data.input_tokens,
        output_tokens=data.output_tokens,
        cached_input_tokens=data.cached_input_tokens,
        body_hash=data.body_hash,
        extra=extra,
    )
    if is_degraded_id(reservation_id):
        return _degraded_settle(key, reservation_id, "committed", usage)

    def commit(owner: Owner | KeyHolder, version: int | None) -> Any:
        return get_engine().commit(
            reservation_id=reservation_id, owner=owner, usage=usage, version=version, report=report
        )

    result = _with_plan(key, commit, missing_ok=True)
    if (
        isinstance(result, Missing)
        and isinstance(key, KeyInfo)
        and lease_restore(reservation_id, owner_of(key))
    ):
        # the store lost it and the ledger still has it: its usage is recorded all the same
        result = _with_plan(key, commit)
    if isinstance(result, Missing):
        raise not_found("reservation")
    if isinstance(result, Conflict):
        if result.state == "released":
            raise QuotaError("conflict", "This reservation was released; it cannot be committed.")
        if result.state == "scheduled":
            raise not_started(result.wait_ms or 0)
        raise QuotaError("conflict", "This reservation was already committed with other usage.")
    assert isinstance(result, Settled)
    _spread_429(result, reservation_id)
    return result


def not_started(wait_ms: int) -> QuotaError:
    """A scheduled reservation committed before its start: its call cannot have happened."""
    return QuotaError(
        "conflict",
        f"This reservation is scheduled: its call may start in {wait_ms} ms, "
        "and be committed once it has.",
        headers={"Retry-After": str(max(1, -(-wait_ms // 1000)))},
        wait_ms=wait_ms,
    )


def reservation_release(
    *, key: Caller, reservation_id: str, data: ReleaseInput | None = None
) -> Settled:
    data = data or ReleaseInput()
    report, extra = upstream_report(data.upstream_status, data.upstream_headers)
    if data.latency_ms is not None:
        extra["latency_ms"] = str(data.latency_ms)
    if is_degraded_id(reservation_id):
        return _degraded_settle(key, reservation_id, "released", Usage(0, 0, extra=extra))
    result = _with_plan(
        key,
        lambda owner, version: get_engine().release(
            reservation_id=reservation_id,
            owner=owner,
            version=version,
            report=report,
            extra=extra,
        ),
    )
    if isinstance(result, Conflict):
        if result.state == "expired":
            raise QuotaError(
                "conflict",
                "This reservation expired and was charged in full; "
                "commit it with its actual usage instead.",
            )
        raise QuotaError("conflict", f"This reservation is already {result.state}.")
    assert isinstance(result, Settled)
    _spread_429(result, reservation_id)
    return result


def _spread_429(settled: Settled, reservation_id: str) -> None:
    """A provider 429 reported on one partition reaches the pool's other partitions, which
    share the provider's account (spread.lua): one script on each, best effort, only for a
    429 (rare), never failing the settlement that reported it."""
    engine = get_engine()
    if settled.spread is None or not engine.partitioned:
        return
    try:
        plan = plans.get()
    except DatabaseError:
        return
    pool = next((p for p in plan.pools if p.slug == settled.spread), None)
    if pool is None:
        return
    origin = engine.reservation_space(reservation_id)
    now_ms = engine.now_ms_estimate()
    own = [
        limit
        for limit in plan.by_tenant.get(None, [])
        if limit.pool_id == pool.id and limit.is_shared_pool_limit
        and limit.window == "minute" and limit.metric != "concurrent" and limit.amount is not None
    ]  # fmt: skip
    for space in engine.spaces:
        if space is origin:
            continue
        checks = [plan.inspection_check(limit, space, now_ms) for limit in own]
        try:
            engine.spread_429(space, pool.slug, pressure_of(pool, space), checks)
        except STORE_UNREACHABLE as exc:
            log.warning("could not spread a provider 429 to partition %s: %s", space.index, exc)


def reservation_extend(*, key: Caller, reservation_id: str, ttl_seconds: int) -> LeaseView:
    if is_degraded_id(reservation_id):
        return _found(
            degraded_lease(
                engine=get_engine(),
                owner=owner_of(_known(key)),
                reservation_id=reservation_id,
                ttl_ms=ttl_seconds * 1000,
                secret=settings.QUOTA_API_KEY_PEPPER,
            )
        )
    result = _with_plan(
        key,
        lambda owner, version: get_engine().extend(
            reservation_id=reservation_id,
            owner=owner,
            ttl_ms=ttl_seconds * 1000,
            version=version,
        ),
    )
    if isinstance(result, Conflict):
        raise QuotaError(
            "conflict",
            f"This reservation is {result.state}; only a held reservation can be extended.",
        )
    assert isinstance(result, LeaseView)
    return result


def reservation_get(*, key: Caller, reservation_id: str) -> LeaseView:
    result = _with_plan(
        key,
        lambda owner, version: get_engine().peek(
            reservation_id=reservation_id, owner=owner, version=version
        ),
    )
    assert isinstance(result, LeaseView)
    return result


def _with_plan(key: Caller, call: EngineCall, *, missing_ok: bool = False) -> Any:
    """Run an engine call with the current plan's version; reload and retry if it is stale
    (and the key is still valid in the new plan). When the plan cannot be loaded, the call
    goes on without it, for the key's own reservations (`_without_plan`)."""
    if isinstance(key, KeyHolder):
        return _without_plan(key, call)
    for _ in range(STALE_RETRIES):
        try:
            plan = plans.get()
        except DatabaseError as exc:
            return _without_plan(holder_of(key), call, exc)
        result = _engine(call, owner_of(key), plan.version)
        if isinstance(result, Stale):
            try:
                key_recheck(plans.reload(older_than=plan), key)
            except DatabaseError as exc:
                return _without_plan(holder_of(key), call, exc)
            continue
        if isinstance(result, Lost):
            store_lost()
            raise STORE_LOST.error()
        if isinstance(result, Missing) and not missing_ok:
            raise not_found("reservation")
        return result
    raise QuotaError(
        "unavailable", "The configuration is changing; try again.", headers={"Retry-After": "1"}
    )


def _without_plan(holder: KeyHolder, call: EngineCall, cause: Exception | None = None) -> Any:
    """Settle or read without a plan (the database is down): what that takes is in the lease
    (tenant, feature, prices, the limits it debited), and the lease says whether this key made
    it. Anything else (another key's reservation, a lease without a digest, no reservation at
    all) answers 503 as every call did without the plan, the same for each, so it tells
    nothing; another key of the tenant settles it once the database is back."""
    if cause is not None:
        log.warning("plan unavailable, settling by the key's digest: %s", cause)
    result = _engine(call, holder, None)
    if isinstance(result, Missing):
        raise database_unavailable()
    return result


def _engine(call: EngineCall, owner: Owner | KeyHolder, version: int | None) -> Any:
    try:
        return call(owner, version)
    except STORE_UNREACHABLE as exc:
        log.warning("store unavailable: %s", exc)
        raise STORE_DOWN.error() from exc


def leases_expire(*, batch: int = 500) -> int:
    """Expire held reservations whose time is up; charged as reserved, slots freed. Every
    partition that answers: one whose shard cannot serve (failing over) is logged and left
    to the next run; raises only when none answers."""
    engine = get_engine()
    total = 0  # what a partition that failed half-way expired counts too

    def reap_all(space: KeySpace) -> None:
        nonlocal total
        while True:
            done = engine.reap(batch=batch, space=space)
            total += done
            if done < batch:
                return

    def left(space: KeySpace, exc: Exception) -> None:
        log.warning(
            "leases of partition %d not expired, its store cannot serve: %s: %s",
            space.index,
            type(exc).__name__,
            exc,
        )

    each_answering(engine.spaces, reap_all, left=left)
    return total


@dataclass(frozen=True, slots=True)
class StoreTrouble:
    """Why the store cannot decide, and the 503 a fail-closed pool answers meanwhile."""

    message: str
    retry_after: str
    reason: str  # the metrics' label

    def error(self) -> QuotaError:
        return QuotaError("unavailable", self.message, headers={"Retry-After": self.retry_after})


STORE_DOWN = StoreTrouble("The quota store is unavailable; try again shortly.", "1", "store_down")
# a rebuild takes about a second (the ledger's sums of the current periods)
STORE_LOST = StoreTrouble(
    "The quota store is being rebuilt from the ledger; try again shortly.", "2", "store_lost"
)


def _unenforced(call: ReserveCall, pool: PoolInfo, trouble: StoreTrouble) -> Granted:
    """The store cannot decide: closed pools refuse; open pools admit, unenforced, and owe
    the ledger an event."""
    tenant, feature = call.meta["tenant"], call.meta["feature"]
    if pool.fail_mode != "open":
        RESERVATIONS.labels("unavailable", trouble.reason, tenant, feature, pool.slug).inc()
        raise trouble.error()
    RESERVATIONS.labels("degraded", trouble.reason, tenant, feature, pool.slug).inc()
    DEGRADED_GRANTS.labels(trouble.reason, tenant, feature, pool.slug).inc()
    model = pool.models.get(call.meta["model"])
    granted = degraded_admit(
        engine=get_engine(),
        call=call,
        pool_slug=pool.slug,
        subject=Subject(call.feature_id, pool.id, model.id if model else None),
        secret=settings.QUOTA_API_KEY_PEPPER,
    )
    drain_in_background(lambda: get_engine())  # the engine of the moment, when it runs
    return granted


def _degraded_settle(key: Caller, reservation_id: str, outcome: str, usage: Usage) -> Settled:
    key = _known(key)
    settled = degraded_settle(
        engine=get_engine(),
        plan=plans.get(),
        owner=owner_of(key),
        key_prefix=key.prefix,
        reservation_id=reservation_id,
        outcome=outcome,
        usage=usage,
        secret=settings.QUOTA_API_KEY_PEPPER,
    )
    if spool_size():  # the store did not take them yet
        drain_in_background(lambda: get_engine())
    return _found(settled)


def _known(key: Caller) -> KeyInfo:
    """A degraded reservation has no lease to record a key's digest: without the plan, the
    key that asks cannot be told to be its tenant's."""
    if isinstance(key, KeyHolder):
        raise database_unavailable()
    return key


def _found(result: Any) -> Any:
    if isinstance(result, Missing):
        raise not_found("reservation")
    return result
