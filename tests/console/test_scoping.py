"""Tenant isolation in the admin: owner b of tenant "bravo" must get nothing of tenant
"acme-hidden" (owned by a) by any road: changelists, guessed change/delete/history URLs,
autocomplete, raw-id popups, inlines, actions, and forged POSTs naming A's ids.

Every object of tenant A carries the marker "acme-hidden" in its name, so a page that shows
any of them, in a row, a filter, a select option or a title, contains the marker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Group, Permission
from django.db.models import Model
from django.test import Client
from django.urls import reverse

from providers.models import LanguageModel, Pool
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

MARKER = "acme-hidden"


@dataclass
class World:
    a: Any
    b: Any
    root: Any
    model: LanguageModel
    pool: Pool
    tenant_a: Tenant
    tenant_b: Tenant
    feature_a: Feature
    feature_b: Feature
    pool_limit: Limit
    limit_a: Limit
    limit_b: Limit
    key_a: ApiKey
    key_b: ApiKey


@pytest.fixture
def world(db: None) -> World:
    a = TenantOwnerFactory(username="a@acme.example")
    b = TenantOwnerFactory(username="b@bravo.example")
    root = UserFactory(username="root@example.com", is_superuser=True)
    model = LanguageModelFactory()
    pool = PoolFactory(slug="shared", served_models=[model])
    tenant_a = TenantFactory(slug=MARKER)
    tenant_a.owners.add(a)
    tenant_b = TenantFactory(slug="bravo")
    tenant_b.owners.add(b)
    ana = UserFactory(username=f"ana@{MARKER}.example")
    feature_a = FeatureFactory(tenant=tenant_a, slug=f"{MARKER}-chat", owner=ana)
    feature_b = FeatureFactory(tenant=tenant_b, slug="bravo-report", owner=b)
    return World(
        a=a,
        b=b,
        root=root,
        model=model,
        pool=pool,
        tenant_a=tenant_a,
        tenant_b=tenant_b,
        feature_a=feature_a,
        feature_b=feature_b,
        pool_limit=LimitFactory(pool=pool, amount=Decimal(100_000)),
        limit_a=LimitFactory(tenant=tenant_a, feature=feature_a, pool=pool, amount=Decimal(20_000)),
        limit_b=LimitFactory(tenant=tenant_b, feature=feature_b, amount=Decimal(5_000)),
        key_a=ApiKeyFactory(tenant=tenant_a, name=f"{MARKER}-key"),
        key_b=ApiKeyFactory(tenant=tenant_b, name="bravo-key"),
    )


def login(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def url(obj: Model | type[Model], view: str, *args: Any) -> str:
    opts = obj._meta
    if isinstance(obj, Model) and not args:
        args = (obj.pk,)
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_{view}", args=args)


def changelist_ids(response: Any) -> set[int]:
    return {row.pk for row in response.context["cl"].result_list}


def form_errors(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.status_code
    return dict(response.context["adminform"].form.errors)


# (other tenant's object, own object) for every tenant-owned model admin; the pool-wide limit
# (no tenant) is invisible to owners like another tenant's row.
CASES = [
    ("tenant_a", "tenant_b"),
    ("feature_a", "feature_b"),
    ("limit_a", "limit_b"),
    ("pool_limit", "limit_b"),
    ("key_a", "key_b"),
]


@pytest.fixture(params=CASES, ids=[theirs for theirs, _ in CASES])
def case(request: pytest.FixtureRequest, world: World) -> tuple[Model, Model]:
    theirs, own = request.param
    return getattr(world, theirs), getattr(world, own)


class TestOwnerSeesNothingOfAnotherTenant:
    @pytest.mark.parametrize("query", ["", "?q=acme", "?_facets=1", "?_to_field=id&_popup=1"])
    def test_changelist_and_raw_id_popup_list_only_own_rows(
        self, world: World, case: tuple[Model, Model], query: str
    ) -> None:
        theirs, own = case
        response = login(world.b).get(url(type(theirs), "changelist") + query)
        assert response.status_code == 200
        assert theirs.pk not in changelist_ids(response)
        if "q=" not in query:
            assert own.pk in changelist_ids(response)
        assert MARKER not in response.content.decode()

    def test_guessed_change_url_answers_like_a_missing_object(
        self, world: World, case: tuple[Model, Model]
    ) -> None:
        theirs, _ = case
        client = login(world.b)
        response = client.get(url(theirs, "change"))
        missing = client.get(url(type(theirs), "change", 999_999))
        assert response.status_code == missing.status_code == 302
        assert response["Location"] == missing["Location"] == reverse("admin:index")

    def test_forged_change_post_changes_nothing(self, world: World) -> None:
        response = login(world.b).post(
            url(world.feature_a, "change"), {"slug": "stolen", "name": "stolen"}
        )
        assert response.status_code == 302
        world.feature_a.refresh_from_db()
        assert world.feature_a.slug == f"{MARKER}-chat"

    def test_delete_url_answers_like_a_missing_object_and_deletes_nothing(
        self, world: World, case: tuple[Model, Model]
    ) -> None:
        theirs, _ = case
        client = login(world.b)
        missing = client.get(url(type(theirs), "delete", 999_999))
        for response in (
            client.get(url(theirs, "delete")),
            client.post(url(theirs, "delete"), {"post": "yes"}),
        ):
            assert response.status_code == missing.status_code
            assert response.get("Location") == missing.get("Location")
        assert type(theirs)._default_manager.filter(pk=theirs.pk).exists()

    def test_history_pages_are_not_found(self, world: World, case: tuple[Model, Model]) -> None:
        theirs, _ = case
        version = theirs.history.latest().history_id  # type: ignore[attr-defined]
        client = login(world.b)
        assert client.get(url(theirs, "history")).status_code == 404
        assert client.get(url(theirs, "simple_history", theirs.pk, version)).status_code == 404
        revert = client.post(url(theirs, "simple_history", theirs.pk, version), {})
        assert revert.status_code == 404

    def test_history_of_a_deleted_object_stays_with_its_tenant(self, world: World) -> None:
        pk_a, pk_b = world.feature_a.pk, world.feature_b.pk
        world.limit_a.delete()
        world.limit_b.delete()
        world.feature_a.delete()
        world.feature_b.delete()
        client = login(world.b)
        assert client.get(url(Feature, "history", pk_a)).status_code == 404
        assert client.get(url(Feature, "history", pk_b)).status_code == 200

    def test_history_of_a_row_moved_to_another_tenant_is_not_found(self, world: World) -> None:
        world.limit_b.tenant, world.limit_b.feature = world.tenant_a, world.feature_a
        world.limit_b.save()
        assert login(world.b).get(url(world.limit_b, "history")).status_code == 404


AUTOCOMPLETE_FIELDS = [
    ("quotas", "limit", "tenant", "tenant_a", "tenant_b"),
    ("quotas", "limit", "feature", "feature_a", "feature_b"),
    ("quotas", "apikey", "tenant", "tenant_a", "tenant_b"),
    ("quotas", "apikey", "features", "feature_a", "feature_b"),
    ("tenants", "feature", "tenant", "tenant_a", "tenant_b"),
]


@pytest.mark.parametrize(
    ("app_label", "model_name", "field_name", "theirs", "own"), AUTOCOMPLETE_FIELDS
)
@pytest.mark.parametrize("term", ["", "a", MARKER])
def test_autocomplete_offers_only_own_tenants_rows(
    world: World, app_label: str, model_name: str, field_name: str, theirs: str, own: str, term: str
) -> None:
    query = {"app_label": app_label, "model_name": model_name, "field_name": field_name}
    response = login(world.b).get(reverse("admin:autocomplete"), {**query, "term": term})
    assert response.status_code == 200
    ids = {int(result["id"]) for result in json.loads(response.content)["results"]}
    assert getattr(world, theirs).pk not in ids
    if term != MARKER:
        assert getattr(world, own).pk in ids
    assert MARKER not in response.content.decode()


def test_owner_cannot_list_people_through_the_owners_autocomplete(world: World) -> None:
    query = {"app_label": "tenants", "model_name": "tenant", "field_name": "owners", "term": ""}
    assert login(world.b).get(reverse("admin:autocomplete"), query).status_code == 403


class TestForgedPostsAttachNothingToAnotherTenant:
    LIMIT = {"metric": "tokens", "window": "minute", "amount": "10", "enforcement": "hard"}

    def test_limit_for_another_tenant(self, world: World) -> None:
        before = Limit.objects.count()
        response = login(world.b).post(
            url(Limit, "add"), {**self.LIMIT, "tenant": world.tenant_a.pk, "alert_at": "[]"}
        )
        assert "tenant" in form_errors(response)
        assert Limit.objects.count() == before

    def test_limit_on_another_tenants_feature(self, world: World) -> None:
        before = Limit.objects.count()
        data = {**self.LIMIT, "tenant": world.tenant_b.pk, "feature": world.feature_a.pk}
        response = login(world.b).post(url(Limit, "add"), {**data, "alert_at": "[]"})
        assert "feature" in form_errors(response)
        assert Limit.objects.count() == before

    def test_limit_moved_onto_another_tenants_feature(self, world: World) -> None:
        data = {**self.LIMIT, "tenant": world.tenant_b.pk, "feature": world.feature_a.pk}
        response = login(world.b).post(url(world.limit_b, "change"), {**data, "alert_at": "[]"})
        assert "feature" in form_errors(response)
        world.limit_b.refresh_from_db()
        assert world.limit_b.feature == world.feature_b

    def test_pool_wide_limit_without_a_tenant(self, world: World) -> None:
        data = {**self.LIMIT, "pool": world.pool.pk, "metric": "requests", "alert_at": "[]"}
        response = login(world.b).post(url(Limit, "add"), data)
        assert "tenant" in form_errors(response)
        assert not Limit.objects.filter(metric="requests").exists()

    def test_api_key_for_another_tenant(self, world: World) -> None:
        response = login(world.b).post(
            url(ApiKey, "add"), {"tenant": world.tenant_a.pk, "name": "forged"}
        )
        assert "tenant" in form_errors(response)
        assert not ApiKey.objects.filter(name="forged").exists()

    def test_api_key_narrowed_to_another_tenants_feature(self, world: World) -> None:
        data = {"tenant": world.tenant_b.pk, "name": "forged", "features": [world.feature_a.pk]}
        response = login(world.b).post(url(ApiKey, "add"), data)
        assert "features" in form_errors(response)
        assert not ApiKey.objects.filter(name="forged").exists()

    def test_own_api_key_given_another_tenants_feature(self, world: World) -> None:
        data = {"name": "bravo-key", "features": [world.feature_a.pk]}
        response = login(world.b).post(url(world.key_b, "change"), data)
        assert "features" in form_errors(response)
        assert not world.key_b.features.exists()

    def test_feature_in_another_tenant(self, world: World) -> None:
        data = {"tenant": world.tenant_a.pk, "slug": "forged", "owner": world.b.pk}
        response = login(world.b).post(url(Feature, "add"), {**data, "priority": "standard"})
        assert "tenant" in form_errors(response)
        assert not Feature.objects.filter(slug="forged").exists()

    def test_feature_owned_by_a_person_of_another_tenant(self, world: World) -> None:
        data = {"tenant": world.tenant_b.pk, "slug": "forged", "owner": world.feature_a.owner_id}
        response = login(world.b).post(url(Feature, "add"), {**data, "priority": "standard"})
        assert "owner" in form_errors(response)
        assert not Feature.objects.filter(slug="forged").exists()

    def test_add_forms_offer_no_choice_of_another_tenant(self, world: World) -> None:
        client = login(world.b)
        for model in (Feature, Limit, ApiKey):
            response = client.get(url(model, "add"))
            assert response.status_code == 200
            assert MARKER not in response.content.decode(), model

    def test_inline_row_pointing_at_another_tenants_limit(self, world: World) -> None:
        client = login(world.b)
        data = form_data(client.get(url(world.feature_b, "change")))
        assert data["limits-0-id"] == world.limit_b.pk
        data.update({"limits-0-id": world.limit_a.pk, "limits-0-amount": "1"})
        response = client.post(url(world.feature_b, "change"), data)
        assert response.status_code == 200
        assert response.context["inline_admin_formsets"][0].formset.errors[0]["id"]
        world.limit_a.refresh_from_db()
        assert world.limit_a.amount == 20_000
        assert world.limit_a.feature == world.feature_a

    def test_revoke_action_on_another_tenants_key(self, world: World) -> None:
        data = {
            "action": "revoke",
            "post": "yes",
            "_selected_action": [world.key_a.pk, world.key_b.pk],
        }
        login(world.b).post(url(ApiKey, "changelist"), data)
        world.key_a.refresh_from_db()
        world.key_b.refresh_from_db()
        assert world.key_a.revoked_at is None
        assert world.key_b.revoked_at is not None

    def test_delete_action_on_another_tenants_feature(self, world: World) -> None:
        data = {
            "action": "delete_selected",
            "post": "yes",
            "_selected_action": [world.feature_a.pk],
        }
        login(world.b).post(url(Feature, "changelist"), data)
        assert Feature.objects.filter(pk=world.feature_a.pk).exists()


def form_data(response: Any) -> dict[str, Any]:
    """What a browser would post back from an admin change page, inlines included."""
    assert response.status_code == 200
    forms = [response.context["adminform"].form]
    for inline in response.context["inline_admin_formsets"]:
        formset = inline.formset
        forms += [formset.management_form, *formset.forms]
    data: dict[str, Any] = {}
    for form in forms:
        for name in form.fields:
            value = form[name].value()
            if value is not None:
                data[form.add_prefix(name)] = value
    return data


class TestOwnerWorksWithOwnTenant:
    def test_change_pages_and_history_of_own_rows(
        self, world: World, case: tuple[Model, Model]
    ) -> None:
        _, own = case
        client = login(world.b)
        assert client.get(url(own, "change")).status_code == 200
        assert client.get(url(own, "history")).status_code == 200
        version = own.history.latest().history_id  # type: ignore[attr-defined]
        assert client.get(url(own, "simple_history", own.pk, version)).status_code == 200

    def test_edits_own_feature(self, world: World) -> None:
        client = login(world.b)
        data = form_data(client.get(url(world.feature_b, "change")))
        response = client.post(url(world.feature_b, "change"), {**data, "name": "Reports"})
        assert response.status_code == 302
        world.feature_b.refresh_from_db()
        assert world.feature_b.name == "Reports"

    def test_cannot_add_or_delete_tenants_or_change_their_owners(self, world: World) -> None:
        client = login(world.b)
        assert client.get(url(Tenant, "add")).status_code == 403
        assert client.post(url(world.tenant_b, "delete"), {"post": "yes"}).status_code == 403
        data = form_data(client.get(url(world.tenant_b, "change")))
        data.update({"name": "Bravo Inc", "owners": [world.a.pk, world.b.pk], "slug": "b2"})
        assert client.post(url(world.tenant_b, "change"), data).status_code == 302
        world.tenant_b.refresh_from_db()
        assert world.tenant_b.name == "Bravo Inc"
        assert (world.tenant_b.slug, list(world.tenant_b.owners.all())) == ("bravo", [world.b])


class TestSharedConfigIsReadOnlyForOwners:
    def test_owner_views_pools_but_cannot_change_them(self, world: World) -> None:
        client = login(world.b)
        assert client.get(url(Pool, "changelist")).status_code == 200
        page = client.get(url(world.pool, "change"))
        assert page.status_code == 200
        assert page.context["has_change_permission"] is False
        assert client.post(url(world.pool, "change"), {"slug": "mine"}).status_code == 403
        assert client.get(url(Pool, "add")).status_code == 403
        assert client.post(url(world.pool, "delete"), {"post": "yes"}).status_code == 403
        world.pool.refresh_from_db()
        assert world.pool.slug == "shared"

    def test_owner_cannot_revert_a_pool_through_its_history(self, world: World) -> None:
        version = world.pool.history.latest().history_id
        client = login(world.b)
        page = url(world.pool, "simple_history", world.pool.pk, version)
        assert client.get(page).status_code == 200
        data = {"slug": "reverted", "provider": world.pool.provider_id, "fail_mode": "open"}
        response = client.post(page, {**data, "position": 0, "protect": "{}"})
        assert response.status_code == 403
        world.pool.refresh_from_db()
        assert world.pool.slug == "shared"

    def test_superuser_changes_pools(self, world: World) -> None:
        client = login(world.root)
        data = form_data(client.get(url(world.pool, "change")))
        assert client.post(url(world.pool, "change"), {**data, "name": "Shared"}).status_code == 302
        world.pool.refresh_from_db()
        assert world.pool.name == "Shared"


def test_superuser_sees_every_tenants_rows(world: World, case: tuple[Model, Model]) -> None:
    theirs, own = case
    client = login(world.root)
    response = client.get(url(type(theirs), "changelist"))
    assert {theirs.pk, own.pk} <= changelist_ids(response)
    assert client.get(url(theirs, "change")).status_code == 200
    assert client.get(url(theirs, "history")).status_code == 200


def test_owner_stays_scoped_whatever_permissions_they_hold(world: World) -> None:
    world.b.user_permissions.set(Permission.objects.all())
    client = login(world.b)
    assert world.limit_a.pk not in changelist_ids(client.get(url(Limit, "changelist")))
    assert client.get(url(world.tenant_a, "change")).status_code == 302
    assert client.post(url(world.pool, "change"), {"slug": "mine"}).status_code == 403


def test_staff_owning_no_tenant_sees_no_tenant_data(world: World) -> None:
    stranger = TenantOwnerFactory(username="stranger@example.com")
    stranger.user_permissions.set(Permission.objects.all())
    client = login(stranger)
    for model in (Tenant, Feature, Limit, ApiKey):
        assert changelist_ids(client.get(url(model, "changelist"))) == set()


def test_owner_group_grants_what_owners_need_and_no_more(db: None) -> None:
    granted = {
        f"{p.content_type.app_label}.{p.codename}"
        for p in Group.objects.get(name="Tenant owners").permissions.select_related("content_type")
    }
    for model in ("tenants.%s_feature", "quotas.%s_limit", "quotas.%s_apikey"):
        assert {model % action for action in ("view", "add", "change", "delete")} <= granted
    assert {"tenants.view_tenant", "tenants.change_tenant"} <= granted
    assert {"providers.view_pool", "providers.view_historicalpool"} <= granted
    assert "tenants.add_tenant" not in granted
    assert "tenants.delete_tenant" not in granted
    assert not {p for p in granted if p.startswith("providers.") and ".view_" not in p}
