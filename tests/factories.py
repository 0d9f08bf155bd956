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
        skip_postgeneration_save = True

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


class ApiKeyFactory(factory.django.DjangoModelFactory):
    """A stored key row; to hold a usable secret, issue one with `quotas.keys.api_key_create`."""

    class Meta:
        model = "quotas.ApiKey"

    tenant = factory.SubFactory(TenantFactory)
    name = factory.Sequence(lambda n: f"key-{n}")
    prefix = factory.Sequence(lambda n: f"{n:012x}")
    hashed_secret = factory.Sequence(lambda n: f"{n:064x}")


class TenantOwnerFactory(UserFactory):
    """A staff user (not a superuser) in the "Tenant owners" group, which grants admin access;
    list them in `Tenant.owners` to give them tenants."""

    class Meta:
        skip_postgeneration_save = True

    @factory.post_generation
    def owner_group(self, create: bool, extracted: object, **kwargs: object) -> None:
        from django.contrib.auth.models import Group

        if create:
            self.groups.add(Group.objects.get(name="Tenant owners"))
