"""Writes the limits of a config file, in an order that makes the result independent of the
order in the file.

A guaranteed share is checked against its pool's capacity and the other guarantees as they
are stored at that moment, so moving 10,000 tokens of guarantee from one feature to another
could be refused half-way. Hence three phases: guarantees that shrink (freeing room), then
limits without guarantees (the pools' capacities), then guarantees that are new or grow.
A capacity is checked against the stored guarantees when it is written; once everything is
written the guarantees on every pool whose capacity changed or was pruned are checked again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

from django.core.exceptions import ValidationError
from django.db.models import Q

from control.configfile.apply import Applier, Skip
from control.configfile.report import Change
from control.configfile.schema import Entry
from providers.models import LanguageModel
from quotas.limits import limit_delete, limit_identity, limit_upsert
from quotas.models import Limit
from quotas.validation import limit_describe_rule, limit_scope_words
from tenants.services import Upserted

SCOPE_KEYS = {name: f"scope.{name}" for name in ("tenant", "feature", "pool", "model")}
SHRINKING, PLAIN, GROWING = 0, 1, 2


@dataclass
class PlannedLimit:
    path: str
    identity: dict[str, Any]
    values: dict[str, Any]
    existing: Limit | None
    keys: dict[str, str] = field(default_factory=lambda: dict(SCOPE_KEYS))
    result: Upserted[Limit] | None = None

    @property
    def written(self) -> Limit | None:
        return self.result.obj if self.result else None

    @property
    def phase(self) -> int:
        old = self.existing.guaranteed if self.existing else None
        new = self.values.get("guaranteed")
        if old is not None and (new is None or new < old):
            return SHRINKING
        return PLAIN if new is None else GROWING

    @property
    def is_capacity(self) -> bool:
        return _is_capacity(self.identity)


def apply_limits(
    app: Applier, entries: list[Entry], *, prune: bool, tenants: set[str], pools: set[str]
) -> None:
    stored = {_stored_key(limit): limit for limit in Limit.objects.all()}
    plans = [plan for entry in entries if (plan := _plan(app, entry, stored)) is not None]
    emptied = _prune(app, plans, tenants=tenants, pools=pools) if prune else set()
    for phase in (SHRINKING, PLAIN, GROWING):
        for plan in plans:
            if plan.phase == phase:
                _write(app, plan)
    for plan in plans:  # reported in the order of the file, not of writing
        if plan.result is not None:
            app.record("limit", plan.result, plan.keys, label(plan.result.obj))
    if not app.errors:  # a half-written run would only yield echoes of the first errors
        _recheck_guarantees(app, plans, emptied)


def label(limit: Limit) -> str:
    return f"{limit_scope_words(limit)}: {limit_describe_rule(limit)}"


def _identity_key(identity: dict[str, Any]) -> tuple[Any, ...]:
    """A limit's identity (`limit_identity`) as a key: its scope's ids, metric and window."""
    return tuple(getattr(v, "pk", v) for v in identity.values())


def _stored_key(limit: Limit) -> tuple[Any, ...]:
    """The same key for a stored limit, from its columns (its scope is not loaded)."""
    ids = {name: getattr(limit, f"{name}_id") for name in ("tenant", "feature", "pool", "model")}
    return _identity_key({**ids, "metric": limit.metric, "window": limit.window})


def _plan(app: Applier, entry: Entry, stored: dict[tuple[Any, ...], Limit]) -> PlannedLimit | None:
    if not entry.valid:
        return None
    data = entry.data
    try:
        scope = _resolve_scope(app, data["scope"], f"{entry.path}.scope")
    except Skip:
        return None
    identity = limit_identity(**scope, metric=data["metric"], window=data.get("window", ""))
    key = _identity_key(identity)
    try:
        app.declare("limit", key, entry.path, "a limit with this scope, metric and window")
    except Skip:
        return None
    values = {k: v for k, v in data.items() if k not in ("scope", "metric", "window")}
    plan = PlannedLimit(entry.path, identity, values, stored.get(key))
    if not data["scope"]:
        plan.keys["tenant"] = "scope"  # "a limit needs a scope" is about the whole scope
    return plan


def _resolve_scope(app: Applier, scope: dict[str, str], path: str) -> dict[str, Any]:
    """The scope's objects by name. Every missing name is reported, not only the first."""
    found: dict[str, Any] = {}
    broken = False
    # In this order: a feature is looked up in its tenant, a model at its pool's provider.
    for name, find in (
        ("tenant", _tenant),
        ("pool", _pool),
        ("feature", _feature),
        ("model", _model),
    ):
        try:
            found[name] = find(app, scope, found, f"{path}.{name}")
        except Skip:
            broken = True
    if broken:
        raise Skip
    return found


def _tenant(app: Applier, scope: dict[str, str], found: dict[str, Any], path: str) -> Any:
    return app.tenant_named(scope["tenant"], path) if "tenant" in scope else None


def _pool(app: Applier, scope: dict[str, str], found: dict[str, Any], path: str) -> Any:
    return app.pool_named(scope["pool"], path) if "pool" in scope else None


def _feature(app: Applier, scope: dict[str, str], found: dict[str, Any], path: str) -> Any:
    if "feature" not in scope:
        return None
    if "tenant" not in scope:
        app.errors.add(path, "name the tenant too: feature slugs are unique within a tenant")
        raise Skip
    if found.get("tenant") is None:
        raise Skip  # the tenant's own error says it
    return app.feature_of(found["tenant"], scope["feature"], path)


def _model(app: Applier, scope: dict[str, str], found: dict[str, Any], path: str) -> Any:
    """By name at the pool's provider; without a pool, a name unique across providers, or
    `provider/name` where it is not."""
    if "model" not in scope:
        return None
    name = scope["model"]
    if "pool" in scope:
        if found.get("pool") is None:
            raise Skip
        return app.model_of(found["pool"].provider, name, path)
    provider, _, rest = name.partition("/")
    qualified = LanguageModel.objects.filter(provider__slug=provider, name=rest)
    candidates = list(qualified) or list(LanguageModel.objects.filter(name=name))
    if len(candidates) > 1:
        owners = ", ".join(sorted(m.provider.slug for m in candidates))
        app.errors.add(path, f"model '{name}' exists at {owners}: write provider/{name}")
        raise Skip
    if not candidates and any(k[0] == "model" and k[1][1] == name for k in app.failed):
        raise Skip  # its own entry failed and says why
    return app.find(
        "model", name, path, candidates[0] if candidates else None, f"no model '{name}'"
    )


def _write(app: Applier, plan: PlannedLimit) -> None:
    key = _identity_key(plan.identity)
    upsert = partial(limit_upsert, **plan.identity, **plan.values)
    plan.result = app.attempt("limit", key, plan.path, upsert, plan.keys)


def _prune(
    app: Applier, plans: list[PlannedLimit], *, tenants: set[str], pools: set[str]
) -> set[int]:
    """Deletes the limits of the file's tenants and pools that the file no longer declares.

    Returns the pools that lost a capacity limit, whose guarantees need checking again.
    """
    kept = {plan.existing.pk for plan in plans if plan.existing is not None}
    stale = (
        Limit.objects.filter(Q(tenant__slug__in=tenants) | Q(pool__slug__in=pools))
        .exclude(pk__in=kept)
        .select_related("tenant", "feature", "pool", "model")
    )
    emptied: set[int] = set()
    for limit in stale:
        identity = limit_identity(pool=limit.pool, metric=limit.metric, window=limit.window)
        if limit.pool is not None and _is_capacity(identity):
            emptied.add(limit.pool.pk)
        words = label(limit)
        limit_delete(limit=limit)
        app.report.add(Change("deleted", "limit", words))
    return emptied


def _recheck_guarantees(app: Applier, plans: list[PlannedLimit], emptied: set[int]) -> None:
    """Checks again every guarantee on the pools whose capacity this file set or removed.

    An error goes to the guarantee's entry when the file declares it, else to the capacity's.
    """
    capacities = {
        (plan.identity["pool"].pk, plan.identity["metric"]): plan.path
        for plan in plans
        if plan.is_capacity and plan.written is not None
    }
    declared = {plan.written.pk: plan for plan in plans if plan.written is not None}
    guarantees = Limit.objects.filter(pool_id__in={pool for pool, _ in capacities} | emptied)
    for limit in guarantees.exclude(guaranteed=None).select_related("pool", "feature", "tenant"):
        try:
            limit.full_clean()
        except ValidationError as error:
            plan = declared.get(limit.pk)
            if plan is not None:
                app.refuse(error, plan.path, plan.keys)
            else:
                path = capacities.get((limit.pool_id, limit.metric), "limits")
                app.refuse(error, path, {"guaranteed": "amount"})


def _is_capacity(identity: dict[str, Any]) -> bool:
    """A pool's own per-minute limit: the capacity that guarantees are shares of."""
    return (
        identity["pool"] is not None
        and identity["tenant"] is None
        and identity["feature"] is None
        and identity["model"] is None
        and identity["window"] == "minute"
    )
