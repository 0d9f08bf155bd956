"""The configuration the reservation benchmark runs against, written with the ORM directly.

Every limit is far above what a run can use, so nothing is refused and the benchmark measures
the decision, not the refusal path. Extra features (for the config-size effect) are spread
over tenants of 100 features each, each with a per-minute token limit, and written with
bulk_create.
"""

from __future__ import annotations

from decimal import Decimal

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.management import call_command

from providers.models import LanguageModel, Pool, Provider
from quotas.keys import api_key_create
from quotas.models import Limit
from quotas.store import config_version_bump
from tenants.models import Feature, Tenant

TENANT = "bench"
FEATURE = "chat"
MODEL = "bench-model"
POOL = "bench-pool"
HUGE = Decimal(10**12)
# A budget of a trillion dollars is 1e21 nano-dollars: past what a double counts exactly, and
# the engine's fit loop then never ends. A million dollars admits 1e10 bench reservations.
BUDGET_USD = Decimal(10**6)
FEATURES_PER_TENANT = 100
BATCH = 5000


def database_reset() -> None:
    call_command("migrate", verbosity=0, interactive=False)
    call_command("flush", verbosity=0, interactive=False)


def config_create() -> str:
    """Creates the bench tenant, feature, model, pool and limits; returns a new API key."""
    owner = get_user_model().objects.create_user("bench-owner", email="owner@bench.example")
    provider = Provider.objects.create(slug="bench")
    model = LanguageModel.objects.create(
        provider=provider,
        name=MODEL,
        input_per_mtok=Decimal("0.15"),
        output_per_mtok=Decimal("0.6"),
    )
    pool = Pool.objects.create(slug=POOL, provider=provider)
    pool.served_models.add(model)
    tenant = Tenant.objects.create(slug=TENANT)
    feature = Feature.objects.create(
        tenant=tenant, slug=FEATURE, owner=owner, priority="interactive"
    )
    for limit in (
        Limit(pool=pool, metric="tokens", window="minute", amount=HUGE),
        Limit(pool=pool, metric="requests", window="minute", amount=HUGE),
        Limit(tenant=tenant, feature=feature, metric="tokens", window="minute", amount=HUGE),
        Limit(tenant=tenant, metric="cost_usd", window="month", amount=BUDGET_USD),
    ):
        limit.full_clean()
        limit.save()
    return api_key_create(tenant=tenant, name="bench").secret


def features_grow(total: int) -> None:
    """Adds features (and their limits) until `total` features are configured."""
    owner = get_user_model().objects.get(username="bench-owner")
    have = Feature.objects.count()
    for start in range(have - 1, total - 1, BATCH):
        _features_add(owner, range(start, min(start + BATCH, total - 1)))
    config_version_bump()


def _features_add(owner: AbstractBaseUser, numbers: range) -> None:
    tenant_slugs = sorted({f"t{n // FEATURES_PER_TENANT:05d}" for n in numbers})
    existing = set(Tenant.objects.filter(slug__in=tenant_slugs).values_list("slug", flat=True))
    Tenant.objects.bulk_create(Tenant(slug=s) for s in tenant_slugs if s not in existing)
    tenants = dict(Tenant.objects.filter(slug__in=tenant_slugs).values_list("slug", "pk"))
    features = Feature.objects.bulk_create(
        Feature(
            tenant_id=tenants[f"t{n // FEATURES_PER_TENANT:05d}"],
            slug=f"f{n:06d}",
            owner=owner,
            priority="standard",
        )
        for n in numbers
    )
    Limit.objects.bulk_create(
        Limit(tenant_id=f.tenant_id, feature=f, metric="tokens", window="minute", amount=HUGE)
        for f in features
    )
