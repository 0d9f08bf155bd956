"""The stored configuration as a config file, in a stable order, which applies as a no-op.

Keys whose value is the default are left out (as a person would write the file), except
the few that matter when reading it: a pool's fail mode, a tenant's time zone, a feature's
priority.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import yaml

from control.configfile.alerts import alert_channels_export
from providers.models import LanguageModel, Pool, Provider
from quotas.models import DEFAULT_ALERT_AT, Enforcement, Limit, Metric, Window
from tenants.models import Feature, Tenant

DEFAULT_CHARS_PER_TOKEN = Decimal("4.00")


class _Flow(dict[str, Any]):
    """A mapping written on one line: a model, a feature, a limit."""


class _FlowList(list[Any]):
    """A list of names written on one line."""


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        # Lists indented under their key, as people write them (and as demo/quota.yaml is).
        return super().increase_indent(flow, False)  # type: ignore[no-any-return]


def _represent_decimal(dumper: yaml.SafeDumper, value: Decimal) -> yaml.Node:
    # Whole amounts as integers (100000, not 100000.000000); the rest as the shortest float
    # that reads back to the same decimal.
    if value == value.to_integral_value():
        return dumper.represent_int(int(value))
    return dumper.represent_float(float(value))


_Dumper.add_representer(Decimal, _represent_decimal)
_Dumper.add_representer(
    _Flow, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=True)
)
_Dumper.add_representer(
    _FlowList, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
)


def config_export() -> str:
    sections = {
        "providers": [_provider(p) for p in Provider.objects.prefetch_related("models")],
        "pools": _pools(),
        "tenants": [_tenant(t) for t in Tenant.objects.prefetch_related("owners")],
        "limits": _limits(),
    }
    if channels := alert_channels_export():
        sections["alert_channels"] = [_Flow(channel) for channel in channels]
    return "\n".join(_dump({name: value}) for name, value in sections.items())


def _dump(section: dict[str, Any]) -> str:
    return yaml.dump(section, Dumper=_Dumper, sort_keys=False, width=4096, allow_unicode=True)


def _optional(**values: Any) -> dict[str, Any]:
    """Only the values that differ from their default (None marks a value left out)."""
    return {key: value for key, value in values.items() if value is not None}


def _provider(provider: Provider) -> dict[str, Any]:
    models = [_model(m) for m in sorted(provider.models.all(), key=lambda m: m.name)]
    return {"slug": provider.slug, **_optional(name=provider.name or None), "models": models}


def _model(model: LanguageModel) -> _Flow:
    return _Flow(
        name=model.name,
        input_per_mtok=model.input_per_mtok,
        **_optional(cached_input_per_mtok=model.cached_input_per_mtok),
        output_per_mtok=model.output_per_mtok,
        **_optional(
            context_window=model.context_window,
            chars_per_token=None
            if model.chars_per_token == DEFAULT_CHARS_PER_TOKEN
            else model.chars_per_token,
        ),
    )


def _pools() -> list[dict[str, Any]]:
    pools = Pool.objects.select_related("provider").prefetch_related("served_models")
    # Applying takes a pool's position from its place in the file unless the entry gives one.
    return [_pool(pool, index) for index, pool in enumerate(pools.order_by("position", "slug"))]


def _pool(pool: Pool, index: int) -> dict[str, Any]:
    return {
        "slug": pool.slug,
        **_optional(name=pool.name or None),
        "provider": pool.provider.slug,
        "models": _FlowList(sorted(m.name for m in pool.served_models.all())),
        "fail_mode": pool.fail_mode,
        **_optional(
            protect=_Flow(pool.protect) if pool.protect else None,
            position=None if pool.position == index else pool.position,
            line_minutes=None if pool.line_minutes == 1 else float(pool.line_minutes),
            backpressure=_Flow(pool.backpressure) if pool.backpressure else None,
        ),
    }


def _tenant(tenant: Tenant) -> dict[str, Any]:
    features = Feature.objects.filter(tenant=tenant).select_related("owner")
    return {
        "slug": tenant.slug,
        **_optional(name=tenant.name or None),
        "timezone": tenant.timezone,
        **_optional(status=None if tenant.status == Tenant.Status.ACTIVE else tenant.status),
        "owners": _FlowList(sorted(_email(user) for user in tenant.owners.all())),
        "features": [_feature(f) for f in features.prefetch_related("pools").order_by("slug")],
    }


def _feature(feature: Feature) -> _Flow:
    pools = sorted(feature.pools.all(), key=lambda p: (p.position, p.slug))
    return _Flow(
        slug=feature.slug,
        **_optional(name=feature.name or None),
        owner=_email(feature.owner),
        priority=feature.priority,
        **_optional(
            status=None if feature.status == Feature.Status.ACTIVE else feature.status,
            pools=[p.slug for p in pools] or None,
        ),
    )


def _email(user: Any) -> str:
    return str(user.email or user.username)


def _limits() -> list[_Flow]:
    limits = Limit.objects.select_related("tenant", "feature", "pool", "model__provider")
    return [_limit(limit) for limit in sorted(limits, key=_limit_order)]


def _limit_order(limit: Limit) -> tuple[Any, ...]:
    # Pool-wide limits first (no tenant), then tenant by tenant, as a person would read them.
    return (
        limit.tenant.slug if limit.tenant else "",
        limit.feature.slug if limit.feature else "",
        limit.pool.slug if limit.pool else "",
        limit.model.name if limit.model else "",
        Metric.values.index(limit.metric),
        Window.values.index(limit.window) if limit.window else -1,
    )


def _limit(limit: Limit) -> _Flow:
    return _Flow(
        scope=_scope(limit),
        metric=limit.metric,
        **_optional(
            window=limit.window or None,
            amount=limit.amount,
            guaranteed=limit.guaranteed,
            burst=limit.burst,
            enforcement=None if limit.enforcement == Enforcement.HARD else limit.enforcement,
            alert_at=None if limit.alert_at == DEFAULT_ALERT_AT else limit.alert_at,
        ),
    )


def _scope(limit: Limit) -> dict[str, str]:
    scope = _optional(
        tenant=limit.tenant.slug if limit.tenant else None,
        feature=limit.feature.slug if limit.feature else None,
        pool=limit.pool.slug if limit.pool else None,
    )
    if limit.model is not None:
        scope["model"] = _model_name(limit.model, qualify=limit.pool is None)
    return scope


def _model_name(model: LanguageModel, *, qualify: bool) -> str:
    """Within a pool the name is enough; without one, the name is qualified by the provider
    where several providers have a model of that name."""
    if qualify and LanguageModel.objects.filter(name=model.name).count() > 1:
        return f"{model.provider.slug}/{model.name}"
    return model.name
