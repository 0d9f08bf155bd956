"""The admin as an owner uses it: API keys shown once, limits in words, the same validation as
the config loader, and an audit trail of who changed what."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from django.conf import settings
from django.contrib import admin
from django.db import connection
from django.db.models import Model
from django.test import Client
from django.urls import reverse

from providers.models import Pool
from quotas.keys import api_key_hash, api_key_split
from quotas.models import ApiKey, Limit
from tenants.models import Feature, Tenant
from tests.factories import (
    ApiKeyFactory,
    FeatureFactory,
    LanguageModelFactory,
    LimitFactory,
    PoolFactory,
    TenantFactory,
    TenantOwnerFactory,
    UserFactory,
)


@dataclass
class Bravo:
    owner: Any
    root: Any
    pool: Pool
    tenant: Tenant
    feature: Feature
    limit: Limit


@pytest.fixture
def bravo(db: None) -> Bravo:
    owner = TenantOwnerFactory(username="b@bravo.example")
    pool = PoolFactory(slug="shared", served_models=[LanguageModelFactory()])
    LimitFactory(pool=pool, amount=Decimal(100_000))
    tenant = TenantFactory(slug="bravo")
    tenant.owners.add(owner)
    feature = FeatureFactory(tenant=tenant, slug="report", owner=owner)
    limit = LimitFactory(tenant=tenant, feature=feature, amount=Decimal(5_000))
    root = UserFactory(username="root@example.com", is_superuser=True)
    ApiKeyFactory(tenant=tenant)
    return Bravo(owner, root, pool, tenant, feature, limit)


def login(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def url(obj: Model | type[Model], view: str, *args: Any) -> str:
    opts = obj._meta
    if isinstance(obj, Model) and not args:
        args = (obj.pk,)
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_{view}", args=args)


def form_data(response: Any) -> dict[str, Any]:
    """What a browser would post back from an admin change page, inlines included."""
    assert response.status_code == 200
    forms = [response.context["adminform"].form]
    for inline in response.context["inline_admin_formsets"]:
        forms += [inline.formset.management_form, *inline.formset.forms]
    data: dict[str, Any] = {}
    for form in forms:
        for name in form.fields:
            value = form[name].value()
            if value is not None:
                data[form.add_prefix(name)] = value
    return data


def stored_values(*tables: str) -> list[str]:
    """Every value of every row of `tables`, read with SQL: what a database dump would show."""
    values = []
    with connection.cursor() as cursor:
        for table in tables:
            cursor.execute(f"SELECT * FROM {table}")
            values += [str(value) for row in cursor.fetchall() for value in row]
    return values


class TestApiKeys:
    def create(self, client: Client, bravo: Bravo) -> Any:
        data = {"tenant": bravo.tenant.pk, "name": "ci", "features": [bravo.feature.pk]}
        return client.post(url(ApiKey, "add"), data)

    def test_creating_a_key_shows_the_secret_once_and_stores_only_its_hmac(
        self, bravo: Bravo
    ) -> None:
        client = login(bravo.owner)
        response = self.create(client, bravo)

        assert response.status_code == 200
        assert "no-store" in response["Cache-Control"]
        secret = response.context["secret"]
        assert secret in response.content.decode()
        api_key = ApiKey.objects.get(name="ci")
        assert api_key_split(secret) == api_key.prefix
        assert api_key.hashed_secret == api_key_hash(secret, pepper=settings.QUOTA_API_KEY_PEPPER)
        assert list(api_key.features.all()) == [bravo.feature]
        random_part = secret.split("_", 2)[2]
        stored = stored_values("quotas_apikey", "quotas_historicalapikey")
        assert not [value for value in stored if random_part in value]

    def test_the_secret_is_never_shown_again(self, bravo: Bravo) -> None:
        client = login(bravo.owner)
        secret = self.create(client, bravo).context["secret"]
        api_key = ApiKey.objects.get(name="ci")
        for page in (url(api_key, "change"), url(ApiKey, "changelist"), url(api_key, "history")):
            content = client.get(page).content.decode()
            assert api_key.prefix in content
            assert secret.split("_", 2)[2] not in content
            assert api_key.hashed_secret not in content
        assert secret not in str(client.cookies)
        assert secret not in str(dict(client.session))

    def test_creation_is_audited_with_who_created_it(self, bravo: Bravo) -> None:
        self.create(login(bravo.owner), bravo)
        api_key = ApiKey.objects.get(name="ci")
        assert api_key.history.earliest().history_user == bravo.owner  # type: ignore[attr-defined]

    def test_revoke_action_revokes_and_records_who(self, bravo: Bravo) -> None:
        client = login(bravo.owner)
        self.create(client, bravo)
        api_key = ApiKey.objects.get(name="ci")
        response = client.post(
            url(ApiKey, "changelist"),
            {"action": "revoke", "post": "yes", "_selected_action": [api_key.pk]},
        )
        assert response.status_code == 302
        api_key.refresh_from_db()
        assert api_key.revoked_at is not None
        latest = api_key.history.latest()  # type: ignore[attr-defined]
        assert (latest.history_user, latest.revoked_at) == (bravo.owner, api_key.revoked_at)

    def test_revoked_at_and_the_secret_fields_are_not_editable(self, bravo: Bravo) -> None:
        client = login(bravo.owner)
        self.create(client, bravo)
        api_key = ApiKey.objects.get(name="ci")
        form = client.get(url(api_key, "change")).context["adminform"].form
        assert set(form.fields) == {"name", "features"}


class TestLimitsInWords:
    def test_changelist_shows_each_limit_in_words(self, bravo: Bravo) -> None:
        content = login(bravo.owner).get(url(Limit, "changelist")).content.decode()
        assert "bravo / report: 5,000 tokens per minute" in content

    def test_feature_page_lists_its_limits_in_words(self, bravo: Bravo) -> None:
        content = login(bravo.owner).get(url(bravo.feature, "change")).content.decode()
        assert "bravo / report: 5,000 tokens per minute" in content

    def test_limit_added_on_the_feature_page_belongs_to_its_tenant(self, bravo: Bravo) -> None:
        client = login(bravo.owner)
        data = form_data(client.get(url(bravo.feature, "change")))
        new_row = {"metric": "requests", "window": "day", "amount": "100", "enforcement": "soft"}
        data.update({f"limits-1-{name}": value for name, value in new_row.items()})
        data.update({"limits-TOTAL_FORMS": 2, "limits-1-alert_at": "[0.8, 0.5]"})
        assert client.post(url(bravo.feature, "change"), data).status_code == 302
        added = Limit.objects.get(metric="requests")
        assert (added.tenant, added.feature, added.alert_at) == (
            bravo.tenant,
            bravo.feature,
            [0.5, 0.8],
        )


class TestSameRulesAsTheConfigLoader:
    def post_limit(self, user: Any, bravo: Bravo, **values: Any) -> Any:
        data = {"tenant": bravo.tenant.pk, "enforcement": "hard", "alert_at": "[]", **values}
        return login(user).post(url(Limit, "add"), data)

    def test_concurrency_limit_takes_no_window(self, bravo: Bravo) -> None:
        response = self.post_limit(
            bravo.owner, bravo, metric="concurrent", window="minute", amount=5
        )
        assert response.status_code == 200
        assert "takes no window" in str(response.context["adminform"].form.errors["window"])
        assert not Limit.objects.filter(metric="concurrent").exists()

    def test_guarantees_cannot_exceed_the_pools_capacity(self, bravo: Bravo) -> None:
        response = self.post_limit(
            bravo.root,
            bravo,
            feature=bravo.feature.pk,
            pool=bravo.pool.pk,
            metric="tokens",
            window="minute",
            guaranteed=200_000,
        )
        assert response.status_code == 200
        assert "capacity of 100,000" in str(response.context["adminform"].form.errors)
        assert not Limit.objects.filter(guaranteed__isnull=False).exists()

    def test_superuser_grants_a_guarantee(self, bravo: Bravo) -> None:
        response = self.post_limit(
            bravo.root,
            bravo,
            feature=bravo.feature.pk,
            pool=bravo.pool.pk,
            metric="tokens",
            window="minute",
            guaranteed=20_000,
        )
        assert response.status_code == 302
        assert Limit.objects.get(guaranteed__isnull=False).guaranteed == 20_000


class TestOwnersDoNotAllocateGuarantees:
    @pytest.fixture
    def guaranteed(self, bravo: Bravo) -> Limit:
        return LimitFactory(
            tenant=bravo.tenant,
            feature=bravo.feature,
            pool=bravo.pool,
            amount=None,
            guaranteed=Decimal(20_000),
        )

    def test_guarantee_is_read_only_for_owners(self, bravo: Bravo, guaranteed: Limit) -> None:
        client = login(bravo.owner)
        data = form_data(client.get(url(guaranteed, "change")))
        assert "guaranteed" not in data
        response = client.post(url(guaranteed, "change"), {**data, "guaranteed": "90000"})
        assert response.status_code == 302
        guaranteed.refresh_from_db()
        assert guaranteed.guaranteed == 20_000

    def test_an_error_about_the_read_only_guarantee_is_shown_not_crashed(
        self, bravo: Bravo, guaranteed: Limit
    ) -> None:
        client = login(bravo.owner)
        data = form_data(client.get(url(guaranteed, "change")))
        response = client.post(url(guaranteed, "change"), {**data, "window": "hour"})
        assert response.status_code == 200
        errors = response.context["adminform"].form.non_field_errors()
        assert any("per-minute" in error for error in errors)
        guaranteed.refresh_from_db()
        assert guaranteed.window == "minute"


def test_history_shows_who_changed_what(bravo: Bravo) -> None:
    client = login(bravo.owner)
    data = form_data(client.get(url(bravo.feature, "change")))
    client.post(url(bravo.feature, "change"), {**data, "name": "Nightly reports"})
    content = client.get(url(bravo.feature, "history")).content.decode()
    assert "b@bravo.example" in content
    assert "Nightly reports" in content


def test_owner_sees_the_admin_index_with_their_models(bravo: Bravo) -> None:
    response = login(bravo.owner).get(reverse("admin:index"))
    models = {m["object_name"] for app in response.context["app_list"] for m in app["models"]}
    assert {"Tenant", "Feature", "Limit", "ApiKey", "Pool", "Provider", "LanguageModel"} <= models


@pytest.mark.parametrize("user", ["owner", "root"])
def test_every_admin_page_renders(bravo: Bravo, user: str) -> None:
    client = login(getattr(bravo, user))
    for model_admin in admin.site._registry.values():
        opts = model_admin.model._meta
        if opts.app_label not in {"tenants", "providers", "quotas"}:
            continue
        changelist = client.get(reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"))
        assert changelist.status_code == 200, opts
        row = changelist.context["cl"].result_list[0]
        for view in ("change", "history"):
            name = f"admin:{opts.app_label}_{opts.model_name}_{view}"
            response = client.get(reverse(name, args=[row.pk]))
            assert response.status_code == 200, (name, response.status_code)
