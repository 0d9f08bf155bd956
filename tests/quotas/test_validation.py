"""Every rule of `quotas.validation` and of the models' clean(), enforced the same way through
the write services and through `quota apply` (where the error names its path in the file,
and nothing is written)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError

from providers.models import LanguageModel, Pool
from providers.services import language_model_upsert, pool_upsert
from quotas.keys import api_key_create
from quotas.limits import limit_create, limit_upsert
from quotas.models import Limit
from tenants.models import Feature, Tenant
from tenants.services import feature_upsert, owner_get_or_create, tenant_upsert
from tests.control.test_configfile import apply, apply_refused, base_config, row_counts
from tests.factories import (
    FeatureFactory,
    LanguageModelFactory,
    LimitFactory,
    PoolFactory,
    ProviderFactory,
    TenantFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def world() -> None:
    """The world of `base_config()`, built with factories: pool `shared` serves gpt-4o-mini
    (not gpt-4o) and has 1,000 tokens a minute; acme has `chat`, globex has `triage`."""
    mini = LanguageModelFactory(name="gpt-4o-mini")
    LanguageModelFactory(name="gpt-4o", provider=mini.provider)
    pool = PoolFactory(slug="shared", provider=mini.provider, served_models=[mini])
    LimitFactory(pool=pool, metric="tokens", window="minute", amount=Decimal(1000))
    FeatureFactory(tenant=TenantFactory(slug="acme"), slug="chat")
    FeatureFactory(tenant=TenantFactory(slug="globex"), slug="triage")


def limit_kwargs(entry: dict[str, Any]) -> dict[str, Any]:
    """A config file's limit entry as the keyword arguments of `limit_upsert`."""
    scope = entry["scope"]
    tenant = Tenant.objects.get(slug=scope["tenant"]) if "tenant" in scope else None
    kwargs: dict[str, Any] = {
        "tenant": tenant,
        "feature": Feature.objects.get(tenant=tenant, slug=scope["feature"])
        if "feature" in scope
        else None,
        "pool": Pool.objects.get(slug=scope["pool"]) if "pool" in scope else None,
        "model": LanguageModel.objects.get(name=scope["model"]) if "model" in scope else None,
        "metric": entry["metric"],
        "window": entry.get("window", ""),
    }
    for key in ("amount", "guaranteed"):
        if key in entry:
            kwargs[key] = Decimal(str(entry[key]))
    for key in ("enforcement", "alert_at"):
        if key in entry:
            kwargs[key] = entry[key]
    return kwargs


ACME = {"tenant": "acme"}
CHAT_ON_SHARED = {"tenant": "acme", "feature": "chat", "pool": "shared"}


def rule(
    rule_id: str, entry: dict[str, Any], field: str, message: str, path: str | None = None
) -> Any:
    """A limit that breaks one rule; `path` is where the file says it, if not at `field`."""
    return pytest.param(entry, field, message, path or field, id=rule_id)


LIMIT_RULES = [
    rule(
        "amount-zero",
        {"scope": ACME, "metric": "tokens", "window": "day", "amount": 0},
        "amount",
        "The amount must be greater than zero.",
    ),
    rule(
        "amount-negative",
        {"scope": ACME, "metric": "cost_usd", "window": "month", "amount": -5},
        "amount",
        "The amount must be greater than zero.",
    ),
    rule(
        "fractional-tokens",
        {"scope": ACME, "metric": "tokens", "window": "day", "amount": 1.5},
        "amount",
        "The amount of a tokens limit is a whole number.",
    ),
    rule(
        "fractional-concurrency",
        {"scope": ACME, "metric": "concurrent", "amount": 2.5},
        "amount",
        "The amount of a concurrent requests limit is a whole number.",
    ),
    rule(
        "fractional-guarantee",
        {"scope": CHAT_ON_SHARED, "metric": "tokens", "window": "minute", "guaranteed": 10.5},
        "guaranteed",
        "The guaranteed of a tokens limit is a whole number.",
    ),
    rule(
        "no-amount",
        {"scope": ACME, "metric": "tokens", "window": "day"},
        "amount",
        "Give an amount (or, for a feature on a pool, a guaranteed share).",
    ),
    rule(
        "no-scope",
        {"scope": {}, "metric": "tokens", "window": "day", "amount": 10},
        "tenant",
        "A limit needs a scope: a tenant, feature, pool or model (or several).",
        path="scope",
    ),
    rule(
        "model-not-served-by-pool",
        {
            "scope": {"pool": "shared", "model": "gpt-4o"},
            "metric": "tokens",
            "window": "minute",
            "amount": 10,
        },
        "model",
        "pool 'shared' does not serve model 'gpt-4o'",
        path="scope.model",
    ),
    rule(
        "guarantees-exceed-capacity",
        {"scope": CHAT_ON_SHARED, "metric": "tokens", "window": "minute", "guaranteed": 1500},
        "guaranteed",
        "guarantees on pool 'shared' would add up to 1,500 tokens per minute, more than its "
        "capacity of 1,000",
    ),
    rule(
        "guarantee-without-pool-capacity",
        {"scope": CHAT_ON_SHARED, "metric": "requests", "window": "minute", "guaranteed": 10},
        "guaranteed",
        "pool 'shared' has no per-minute requests limit to guarantee a share of",
    ),
    rule(
        "guarantee-without-feature-on-pool",
        {"scope": ACME, "metric": "tokens", "window": "minute", "guaranteed": 10},
        "guaranteed",
        "A guaranteed share is given to a feature on a pool: name both.",
    ),
    rule(
        "guarantee-on-a-budget",
        {"scope": CHAT_ON_SHARED, "metric": "tokens", "window": "day", "guaranteed": 10},
        "guaranteed",
        "A guaranteed share applies to per-minute token or request limits.",
    ),
    rule(
        "guarantee-on-a-soft-limit",
        {
            "scope": CHAT_ON_SHARED,
            "metric": "tokens",
            "window": "minute",
            "guaranteed": 10,
            "enforcement": "soft",
        },
        "guaranteed",
        "A guaranteed share is only meaningful on a hard limit.",
    ),
    rule(
        "ceiling-below-guarantee",
        {
            "scope": CHAT_ON_SHARED,
            "metric": "tokens",
            "window": "minute",
            "amount": 100,
            "guaranteed": 200,
        },
        "amount",
        "The ceiling (amount) cannot be below the guaranteed share.",
    ),
    rule(
        "concurrency-with-a-window",
        {"scope": ACME, "metric": "concurrent", "window": "minute", "amount": 3},
        "window",
        "A concurrency limit counts calls in flight at any instant; it takes no window.",
    ),
    rule(
        "missing-window",
        {"scope": ACME, "metric": "tokens", "amount": 3},
        "window",
        "Choose a window: minute, hour, day or month.",
    ),
    rule(
        "alert-at-zero",
        {"scope": ACME, "metric": "tokens", "window": "day", "amount": 3, "alert_at": [0, 1]},
        "alert_at",
        "Alert thresholds are fractions of the amount, e.g. [0.5, 0.8, 1.0].",
    ),
    rule(
        "alert-at-not-numbers",
        {"scope": ACME, "metric": "tokens", "window": "day", "amount": 3, "alert_at": ["half"]},
        "alert_at",
        "Alert thresholds are fractions of the amount, e.g. [0.5, 0.8, 1.0].",
    ),
    rule(
        "alert-at-not-a-list",
        {"scope": ACME, "metric": "tokens", "window": "day", "amount": 3, "alert_at": 0.5},
        "alert_at",
        "Alert thresholds are fractions of the amount, e.g. [0.5, 0.8, 1.0].",
    ),
]


@pytest.mark.usefixtures("world")
@pytest.mark.parametrize(("entry", "field", "message", "path"), LIMIT_RULES)
def test_limit_service_refuses(entry: dict[str, Any], field: str, message: str, path: str) -> None:
    with pytest.raises(ValidationError) as refused:
        limit_upsert(**limit_kwargs(entry))

    assert refused.value.message_dict == {field: [message]}
    assert Limit.objects.count() == 1  # only the pool's capacity


@pytest.mark.parametrize(("entry", "field", "message", "path"), LIMIT_RULES)
def test_quota_apply_refuses(
    tmp_path: Path, entry: dict[str, Any], field: str, message: str, path: str
) -> None:
    config = base_config()
    config["limits"].append(entry)

    assert apply_refused(tmp_path, config) == [f"limits[1].{path}: {message}"]
    assert set(row_counts().values()) == {0}


@pytest.mark.usefixtures("world")
def test_the_same_limits_pass_when_the_rule_is_kept() -> None:
    chat = Feature.objects.get(slug="chat")
    pool = Pool.objects.get(slug="shared")
    acme = chat.tenant

    limit_upsert(tenant=acme, metric="cost_usd", window="month", amount=Decimal("12.50"))
    limit_upsert(
        feature=chat,
        pool=pool,
        metric="tokens",
        window="minute",
        amount=Decimal(1000),
        guaranteed=Decimal(1000),  # the whole capacity may be guaranteed, no more
    )
    limit_upsert(tenant=acme, metric="concurrent", amount=Decimal(3), alert_at=[1.0, 0.5, 1.0])

    assert Limit.objects.count() == 4
    assert Limit.objects.get(metric="concurrent").alert_at == [0.5, 1.0]
    assert Limit.objects.get(feature=chat).tenant == acme  # a feature's limit is its tenant's


# Scope rules that a file states differently from the service.


@pytest.mark.usefixtures("world")
def test_limit_service_refuses_a_feature_of_another_tenant() -> None:
    with pytest.raises(ValidationError) as refused:
        limit_upsert(
            tenant=Tenant.objects.get(slug="acme"),
            feature=Feature.objects.get(slug="triage"),
            metric="tokens",
            window="day",
            amount=Decimal(10),
        )

    assert refused.value.message_dict == {"feature": ["no feature 'triage' in tenant 'acme'"]}


def test_quota_apply_refuses_a_feature_of_another_tenant(tmp_path: Path) -> None:
    config = base_config()
    config["limits"].append(
        {
            "scope": {"tenant": "acme", "feature": "triage"},
            "metric": "tokens",
            "window": "day",
            "amount": 10,
        }
    )

    assert apply_refused(tmp_path, config) == [
        "limits[1].scope.feature: no feature 'triage' in tenant 'acme'"
    ]
    assert set(row_counts().values()) == {0}


@pytest.mark.usefixtures("world")
def test_limit_service_refuses_a_duplicate_limit() -> None:
    capacity = {"pool": Pool.objects.get(slug="shared"), "metric": "tokens", "window": "minute"}

    with pytest.raises(ValidationError) as refused:
        limit_create(**capacity, amount=Decimal(5))

    assert refused.value.message_dict == {
        "metric": ["This scope already has a tokens per minute limit."]
    }
    updated = limit_upsert(**capacity, amount=Decimal(5))  # the same identity is an update
    assert (updated.action, Limit.objects.get().amount) == ("updated", 5)


def test_quota_apply_refuses_a_duplicate_limit(tmp_path: Path) -> None:
    config = base_config()
    config["limits"].append({**config["limits"][0], "amount": 5})

    assert apply_refused(tmp_path, config) == [
        "limits[1]: a limit with this scope, metric and window is declared twice "
        "(first at limits[0])"
    ]
    assert set(row_counts().values()) == {0}


# Tenants, features and their owners.

BAD_TIMEZONE = "'Mars/Base' is not an IANA time zone (for example Europe/Berlin)."


def test_tenant_service_refuses_a_bad_timezone() -> None:
    with pytest.raises(ValidationError) as refused:
        tenant_upsert(slug="acme", timezone="Mars/Base")

    assert refused.value.message_dict == {"timezone": [BAD_TIMEZONE]}
    assert not Tenant.objects.exists()


def test_quota_apply_refuses_a_bad_timezone(tmp_path: Path) -> None:
    config = base_config()
    config["tenants"][0]["timezone"] = "Mars/Base"

    assert apply_refused(tmp_path, config) == [f"tenants[0].timezone: {BAD_TIMEZONE}"]
    assert set(row_counts().values()) == {0}


def test_tenant_service_refuses_a_bad_slug() -> None:
    with pytest.raises(ValidationError) as refused:
        tenant_upsert(slug="Acme Corp")

    assert list(refused.value.message_dict) == ["slug"]


def test_quota_apply_refuses_a_bad_slug(tmp_path: Path) -> None:
    config = base_config()
    config["tenants"][1]["slug"] = "Globex Inc"

    errors = apply_refused(tmp_path, config)

    assert len(errors) == 1
    assert errors[0].startswith("tenants[1].slug: Enter a valid “slug”")


NO_OWNER_EMAIL = "The owner needs an e-mail address to receive alerts."


def test_feature_service_refuses_an_owner_without_email() -> None:
    tenant = TenantFactory(slug="acme")
    owner = UserFactory(username="ana", email="")

    with pytest.raises(ValidationError) as refused:
        feature_upsert(tenant=tenant, slug="chat", owner=owner)

    assert refused.value.message_dict == {"owner": [NO_OWNER_EMAIL]}
    assert not Feature.objects.exists()


def test_quota_apply_refuses_an_owner_without_email(tmp_path: Path) -> None:
    # An existing account is used as it is, so a blank e-mail is not quietly filled in.
    user_model = get_user_model()
    user_model.objects.create(username="ana@acme.example", email="")

    assert apply_refused(tmp_path, base_config()) == [
        f"tenants[0].features[0].owner: {NO_OWNER_EMAIL}"
    ]
    assert not Tenant.objects.exists()
    assert user_model.objects.count() == 1


def test_owner_service_refuses_an_address_that_is_not_an_email() -> None:
    with pytest.raises(ValidationError) as refused:
        owner_get_or_create(email="ana")

    assert refused.value.message_dict == {"email": ["'ana' is not an e-mail address"]}
    assert not get_user_model().objects.exists()


def test_quota_apply_refuses_an_owner_that_is_not_an_email(tmp_path: Path) -> None:
    config = base_config()
    config["tenants"][0]["owners"] = ["ops@acme.example", "ops"]
    config["tenants"][1]["features"][0]["owner"] = "cy at globex"

    assert apply_refused(tmp_path, config) == [
        "tenants[0].owners[1]: 'ops' is not an e-mail address",
        "tenants[1].features[0].owner: 'cy at globex' is not an e-mail address",
    ]
    assert set(row_counts().values()) == {0}


# Pools and models.

PROTECT_RULES = [
    pytest.param(
        {"turbo": 0.3},
        "'turbo' is not a priority class (interactive, standard, batch, background).",
        id="unknown-class",
    ),
    pytest.param(
        {"interactive": 1.5},
        "The share for interactive must be between 0 and 1.",
        id="share-above-one",
    ),
    pytest.param(
        {"interactive": 0}, "The share for interactive must be between 0 and 1.", id="share-zero"
    ),
    pytest.param(
        {"interactive": True},
        "The share for interactive must be between 0 and 1.",
        id="share-not-a-number",
    ),
    pytest.param(
        {"interactive": 0.6, "standard": 0.5},
        "Protected shares must add up to less than 1.",
        id="shares-sum-to-one",
    ),
    pytest.param([0.3], "Give a mapping of priority class to a fraction.", id="not-a-mapping"),
]


@pytest.mark.parametrize(("protect", "message"), PROTECT_RULES)
def test_pool_service_refuses_a_bad_protect(protect: Any, message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        pool_upsert(slug="shared", provider=ProviderFactory(), protect=protect)

    assert refused.value.message_dict == {"protect": [message]}
    assert not Pool.objects.exists()


@pytest.mark.parametrize(("protect", "message"), PROTECT_RULES)
def test_quota_apply_refuses_a_bad_protect(tmp_path: Path, protect: Any, message: str) -> None:
    config = base_config()
    config["pools"][0]["protect"] = protect

    assert apply_refused(tmp_path, config) == [f"pools[0].protect: {message}"]
    assert set(row_counts().values()) == {0}


def test_pool_service_refuses_another_providers_model() -> None:
    claude = LanguageModelFactory(provider=ProviderFactory(slug="anthropic"), name="claude")

    with pytest.raises(ValidationError) as refused:
        pool_upsert(slug="shared", provider=ProviderFactory(slug="openai"), served_models=[claude])

    assert refused.value.message_dict == {
        "served_models": ["not models of provider 'openai': claude"]
    }
    assert not Pool.objects.exists()


def test_quota_apply_looks_a_pools_models_up_at_its_provider(tmp_path: Path) -> None:
    config = base_config()
    config["providers"].append(
        {
            "slug": "anthropic",
            "models": [{"name": "claude", "input_per_mtok": 3, "output_per_mtok": 15}],
        }
    )
    config["pools"][0]["models"].append("claude")

    assert apply_refused(tmp_path, config) == [
        "pools[0].models[1]: provider 'openai' has no model 'claude'"
    ]


def test_model_service_refuses_a_negative_price() -> None:
    with pytest.raises(ValidationError) as refused:
        language_model_upsert(
            provider=ProviderFactory(),
            name="gpt-4o",
            input_per_mtok=Decimal(-1),
            output_per_mtok=Decimal(10),
        )

    assert refused.value.message_dict == {
        "input_per_mtok": ["Ensure this value is greater than or equal to 0."]
    }


def test_quota_apply_refuses_a_negative_price(tmp_path: Path) -> None:
    config = base_config()
    config["providers"][0]["models"][1]["output_per_mtok"] = -10

    assert apply_refused(tmp_path, config) == [
        "providers[0].models[1].output_per_mtok: Ensure this value is greater than or equal to 0."
    ]
    assert set(row_counts().values()) == {0}


# API keys (not part of a config file: created by `quota key create`).


def test_an_api_key_cannot_be_revoked_before_it_was_created() -> None:
    key = api_key_create(tenant=TenantFactory()).api_key
    key.revoked_at = key.created_at - timedelta(seconds=1)

    with pytest.raises(ValidationError) as refused:
        key.full_clean()

    assert refused.value.message_dict == {
        "revoked_at": ["A key cannot be revoked before it was created."]
    }


def test_a_valid_file_still_applies(tmp_path: Path) -> None:
    """The refusals above come from the one change each made to this file."""
    assert apply(tmp_path, base_config()).splitlines()[-1].startswith("12 created")


def test_a_pool_capacity_cannot_be_lowered_below_its_guarantees(db: None) -> None:
    from decimal import Decimal

    from quotas.models import Limit
    from tests.factories import FeatureFactory, PoolFactory

    pool = PoolFactory(slug="cap")
    feature = FeatureFactory()
    capacity = Limit.objects.create(pool=pool, metric="tokens", window="minute", amount=10_000)
    Limit.objects.create(
        tenant=feature.tenant,
        feature=feature,
        pool=pool,
        metric="tokens",
        window="minute",
        guaranteed=Decimal(6000),
    )

    capacity.amount = Decimal(5000)
    with pytest.raises(ValidationError) as refused:
        capacity.full_clean()

    assert refused.value.message_dict == {
        "amount": [
            "guarantees on pool 'cap' would add up to 6,000 tokens per minute, "
            "more than its capacity of 5,000"
        ]
    }
