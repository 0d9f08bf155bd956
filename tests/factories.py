from __future__ import annotations

from decimal import Decimal

import factory
from django.contrib.auth import get_user_model

from providers.models import LanguageModel, Pool, Provider
from quotas.models import Limit
from tenants.models import Feature, Tenant


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"person{n}@example.com")
    email = factory.LazyAttribute(lambda u: u.username)
    is_staff = True


class TenantFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Tenant
        django_get_or_create = ("slug",)

    slug = factory.Sequence(lambda n: f"tenant-{n}")
    name = factory.LazyAttribute(lambda t: t.slug.title())
    timezone = "UTC"


class FeatureFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Feature

    tenant = factory.SubFactory(TenantFactory)
    slug = factory.Sequence(lambda n: f"feature-{n}")
    owner = factory.SubFactory(UserFactory)
    priority = "standard"


class ProviderFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Provider
        django_get_or_create = ("slug",)

    slug = "openai"


class LanguageModelFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = LanguageModel
        django_get_or_create = ("provider", "name")

    provider = factory.SubFactory(ProviderFactory)
    name = "gpt-4o-mini"
    input_per_mtok = Decimal("0.15")
    cached_input_per_mtok = Decimal("0.075")
    output_per_mtok = Decimal("0.60")


class PoolFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Pool
        django_get_or_create = ("slug",)

    slug = factory.Sequence(lambda n: f"pool-{n}")
    provider = factory.SubFactory(ProviderFactory)

    @factory.post_generation
    def served_models(self, create: bool, extracted: list[LanguageModel] | None) -> None:
        if create and extracted:
            self.served_models.add(*extracted)


class LimitFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Limit

    metric = "tokens"
    window = "minute"
    amount = Decimal(1000)
