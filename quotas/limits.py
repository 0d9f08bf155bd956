"""Writes to limits. Every rule a limit must satisfy runs from `Limit.clean()` (which calls
`quotas.validation`) through `full_clean()`, so these services refuse exactly what the admin
refuses, with the same words."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db import transaction

from providers.models import LanguageModel, Pool
from quotas.models import DEFAULT_ALERT_AT, Enforcement, Limit
from tenants.models import Feature, Tenant
from tenants.services import Upserted, model_upsert


def limit_identity(
    *,
    tenant: Tenant | None = None,
    feature: Feature | None = None,
    pool: Pool | None = None,
    model: LanguageModel | None = None,
    metric: str,
    window: str = "",
) -> dict[str, Any]:
    """What makes a limit the same limit: its scope, metric and window (not its amount)."""
    if feature is not None and tenant is None:
        tenant = feature.tenant  # a feature's limit is always its tenant's too
    return {
        "tenant": tenant,
        "feature": feature,
        "pool": pool,
        "model": model,
        "metric": metric,
        "window": window,
    }


def limit_upsert(
    *,
    tenant: Tenant | None = None,
    feature: Feature | None = None,
    pool: Pool | None = None,
    model: LanguageModel | None = None,
    metric: str,
    window: str = "",
    amount: Decimal | None = None,
    guaranteed: Decimal | None = None,
    enforcement: str = Enforcement.HARD,
    alert_at: list[float] | None = None,
    burst: Decimal | None = None,
) -> Upserted[Limit]:
    """Create the limit with this scope, metric and window, or update its amounts."""
    identity = limit_identity(
        tenant=tenant, feature=feature, pool=pool, model=model, metric=metric, window=window
    )
    return model_upsert(
        Limit,
        lookup=identity,
        values={
            "amount": amount,
            "guaranteed": guaranteed,
            "enforcement": enforcement,
            "alert_at": list(DEFAULT_ALERT_AT) if alert_at is None else alert_at,
            "burst": burst,
        },
    )


def limit_create(
    *,
    tenant: Tenant | None = None,
    feature: Feature | None = None,
    pool: Pool | None = None,
    model: LanguageModel | None = None,
    metric: str,
    window: str = "",
    amount: Decimal | None = None,
    guaranteed: Decimal | None = None,
    enforcement: str = Enforcement.HARD,
    alert_at: list[float] | None = None,
) -> Limit:
    """A new limit; refused (by validation) when its scope already has one like it."""
    limit = Limit(
        tenant=tenant,
        feature=feature,
        pool=pool,
        model=model,
        metric=metric,
        window=window,
        amount=amount,
        guaranteed=guaranteed,
        enforcement=enforcement,
        alert_at=list(DEFAULT_ALERT_AT) if alert_at is None else alert_at,
    )
    limit.full_clean()
    limit.save()
    return limit


@transaction.atomic
def limit_delete(*, limit: Limit) -> None:
    limit.delete()
