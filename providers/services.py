"""Writes to providers, their models and pools."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError

from providers.models import LanguageModel, Pool, Provider
from tenants.services import Upserted, model_upsert


def provider_upsert(*, slug: str, name: str = "") -> Upserted[Provider]:
    return model_upsert(Provider, lookup={"slug": slug}, values={"name": name})


def language_model_upsert(
    *,
    provider: Provider,
    name: str,
    input_per_mtok: Decimal,
    output_per_mtok: Decimal,
    cached_input_per_mtok: Decimal | None = None,
    context_window: int | None = None,
    chars_per_token: Decimal = Decimal("4.00"),
) -> Upserted[LanguageModel]:
    return model_upsert(
        LanguageModel,
        lookup={"provider": provider, "name": name},
        values={
            "input_per_mtok": input_per_mtok,
            "cached_input_per_mtok": cached_input_per_mtok,
            "output_per_mtok": output_per_mtok,
            "context_window": context_window,
            "chars_per_token": chars_per_token,
        },
    )


def pool_upsert(
    *,
    slug: str,
    provider: Provider,
    name: str = "",
    served_models: Iterable[LanguageModel] = (),
    fail_mode: str = Pool.FailMode.CLOSED,
    protect: dict[str, Any] | None = None,
    position: int = 0,
    line_minutes: Decimal = Decimal(1),
    backpressure: dict[str, Any] | None = None,
) -> Upserted[Pool]:
    served_models = list(served_models)
    # A pool is one provider account: it cannot serve another provider's models, and
    # Pool.clean() cannot see the many-to-many before the pool is saved.
    strangers = sorted(m.name for m in served_models if m.provider_id != provider.pk)
    if strangers:
        raise ValidationError(
            {"served_models": f"not models of provider '{provider.slug}': {', '.join(strangers)}"}
        )
    return model_upsert(
        Pool,
        lookup={"slug": slug},
        values={
            "provider": provider,
            "name": name,
            "fail_mode": fail_mode,
            "protect": {} if protect is None else protect,
            "position": position,
            "line_minutes": line_minutes,
            "backpressure": {} if backpressure is None else backpressure,
        },
        m2m={"served_models": served_models},
    )
