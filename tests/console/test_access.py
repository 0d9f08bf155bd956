"""Who may act: naming someone owner is the one step that lets them in, with the least that
serves. A feature's owner acts on their feature (live state, pause, boost, its keys) and on
nothing else; a tenant's owner on the whole tenant; removing the ownership takes it back; a
page someone may not see says so; owners set their password by e-mail."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core import mail
from django.test import Client
from django.urls import reverse

from console.access import FEATURE_OWNER, TENANT_OWNER
from quotas.keys import api_key_create
from quotas.models import ApiKey, Limit
from tests.factories import FeatureFactory, UserFactory
from tests.fixtures import World

PASSWORD = "a-long-enough-passphrase-7"


def person(email: str, password: str | None = None) -> Any:
    """An account as the config file makes one: not staff, in no group."""
    user = UserFactory(username=email, email=email, is_staff=False)
    if password is None:
        user.set_unusable_password()
    else:
        user.set_password(password)
    user.save()
    return user


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def admin_url(obj: Any, action: str = "change") -> str:
    opts = obj._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_{action}", args=[obj.pk])


@pytest.fixture
def cy(world: World) -> Any:
    """The owner of acme/chat, and of nothing else."""
    cy = person("cy@globex.example", PASSWORD)
    world.chat.owner = cy
    world.chat.save()
    return cy


@pytest.fixture
def limits(world: World) -> dict[str, Limit]:
    return {
        "chat": world.limit(
            tenant=world.tenant, feature=world.chat, metric="requests", window="day", amount=10
        ),
        "batch": world.limit(
            tenant=world.tenant, feature=world.batch, metric="requests", window="day", amount=10
        ),
        "tenant": world.limit(tenant=world.tenant, metric="requests", window="day", amount=50),
    }


pytestmark = pytest.mark.django_db


def test_a_feature_owner_logs_in_with_no_staff_flag_and_no_group(cy: Any) -> None:
    client = Client()
    response = client.post(
        reverse("admin:login"), {"username": cy.username, "password": PASSWORD, "next": "/admin/"}
    )
    assert response.status_code == 302 and response["Location"] == "/admin/"
    assert client.get("/admin/").status_code == 200
    assert cy.get_all_permissions() == set(FEATURE_OWNER)


def test_someone_who_owns_nothing_and_is_not_staff_cannot_log_in(world: World) -> None:
    nobody = person("nobody@example.com", PASSWORD)
    response = Client().post(
        reverse("admin:login"), {"username": nobody.username, "password": PASSWORD}
    )
    assert response.status_code == 200 and "errornote" in response.content.decode()
    assert logged_in(nobody).get("/admin/").status_code == 302  # to the login page


def test_a_feature_owner_sees_their_feature_pauses_it_and_boosts_its_limit(
    world: World, cy: Any, limits: dict[str, Limit]
) -> None:
    client = logged_in(cy)
    page = client.get(admin_url(world.chat)).content.decode()
    assert 'id="live"' in page and 'id="feature-pause"' in page
    assert admin_url(limits["chat"], "boost") in page
    assert admin_url(limits["tenant"], "boost") not in page  # the tenant's, not theirs

    client.post(admin_url(world.chat, "status"), {"status": "paused"})
    world.chat.refresh_from_db()
    assert world.chat.status == "paused"

    boosted = client.post(admin_url(limits["chat"], "boost"), {"amount": "20", "hours": "4"})
    assert boosted.status_code == 302
    limits["chat"].refresh_from_db()
    assert limits["chat"].boost_amount == Decimal(20)


def test_a_feature_owner_reaches_nothing_else(
    world: World, cy: Any, limits: dict[str, Limit]
) -> None:
    client = logged_in(cy)
    assert client.get(admin_url(world.batch)).status_code == 302  # "does not exist"
    assert client.post(admin_url(world.batch, "status"), {"status": "paused"}).status_code == 404
    for limit in (limits["batch"], limits["tenant"]):
        assert (
            client.post(admin_url(limit, "boost"), {"amount": "99", "hours": "4"}).status_code
            == 404
        )
    world.batch.refresh_from_db()
    assert world.batch.status == "active"
    assert not Limit.objects.filter(boost_amount__isnull=False).exists()
    listed = client.get(reverse("admin:tenants_feature_changelist")).content.decode()
    assert "acme/chat" in listed and "acme/batch" not in listed
    assert client.get(admin_url(world.tenant)).status_code in (302, 403)


def test_a_feature_owner_acts_but_does_not_configure(
    world: World, cy: Any, limits: dict[str, Limit]
) -> None:
    """The feature's owner, priority and the limit's amount are the tenant owners' to set."""
    client = logged_in(cy)
    other = UserFactory(username="someone@else.example")
    client.post(
        admin_url(world.chat),
        {
            "slug": "chat",
            "name": "Chat",
            "owner": other.pk,
            "priority": "background",
            "status": "active",
            "limits-TOTAL_FORMS": 0,
            "limits-INITIAL_FORMS": 0,
        },
    )
    world.chat.refresh_from_db()
    assert (world.chat.owner, world.chat.priority, world.chat.name) == (cy, "interactive", "Chat")
    client.post(admin_url(limits["chat"]), {"amount": "1000", "alert_at": "10"})
    limits["chat"].refresh_from_db()
    assert limits["chat"].amount == Decimal(10)
    page = client.get(admin_url(limits["chat"])).content.decode()
    assert "10.000000" not in page and "80%" in page  # shown as the owner typed it
    assert 'name="_save"' not in page  # read-only: nothing to save


def test_a_feature_owner_sees_and_revokes_only_keys_of_their_features(
    world: World, cy: Any
) -> None:
    theirs = api_key_create(tenant=world.tenant, name="chat-bot", features=[world.chat]).api_key
    mixed = api_key_create(tenant=world.tenant, name="both", features=[world.chat, world.batch])
    whole_tenant = ApiKey.objects.get(name="test")  # the world's key, for every feature
    client = logged_in(cy)
    listed = client.get(reverse("admin:quotas_apikey_changelist")).content.decode()
    assert "chat-bot" in listed and "both" not in listed and ">test<" not in listed
    for key in (mixed.api_key, whole_tenant):
        assert client.post(admin_url(key, "revoke")).status_code == 404
    asked = client.get(admin_url(theirs, "revoke"))
    assert "Yes, revoke it" in asked.content.decode()
    theirs.refresh_from_db()
    assert theirs.revoked_at is None  # asking changes nothing
    client.post(admin_url(theirs, "revoke"))
    theirs.refresh_from_db()
    assert theirs.revoked_at is not None


def test_a_tenant_owner_named_in_one_step_configures_the_tenant(
    world: World, limits: dict[str, Limit]
) -> None:
    dee = person("dee@acme.example", PASSWORD)
    world.tenant.owners.add(dee)
    assert dee.get_all_permissions() == set(TENANT_OWNER)
    client = logged_in(dee)
    assert client.get(admin_url(world.tenant)).status_code == 200
    assert (
        admin_url(limits["tenant"], "boost") in client.get(admin_url(world.tenant)).content.decode()
    )
    typed = {"metric": "requests", "window": "day", "amount": "60", "alert_at": "50, 80, 100"}
    client.post(
        admin_url(limits["tenant"]), {"tenant": world.tenant.pk, "enforcement": "hard", **typed}
    )
    limits["tenant"].refresh_from_db()
    assert (limits["tenant"].amount, limits["tenant"].alert_at) == (Decimal(60), [0.5, 0.8, 1.0])


def test_no_longer_an_owner_no_longer_in(world: World, cy: Any) -> None:
    client = logged_in(cy)
    assert client.get("/admin/").status_code == 200
    world.chat.owner = UserFactory(username="next@acme.example")
    world.chat.save()
    assert client.get("/admin/").status_code == 302
    assert client.get(admin_url(world.chat)).status_code == 302


def test_a_page_one_may_not_see_says_so_in_the_admins_look(world: World, cy: Any) -> None:
    response = logged_in(cy).get(reverse("admin:tenants_tenant_add"))
    page = response.content.decode()
    assert response.status_code == 403
    assert "You may not see this page" in page and "LLM quota administration" in page
    assert 'href="/admin/"' in page  # the way back to their dashboard


def test_no_view_site_link(cy: Any) -> None:
    assert "View site" not in logged_in(cy).get("/admin/").content.decode()


def test_an_owner_without_a_password_sets_one_by_mail(world: World) -> None:
    eve = person("eve@acme.example")
    world.tenant.owners.add(eve)
    stranger = person("stranger@example.com")  # no password, owns nothing: Django's rule
    client = Client()
    assert (
        "Forgotten your login credentials?" in client.get(reverse("admin:login")).content.decode()
    )
    for address in (eve.email, stranger.email):
        response = client.post(reverse("admin_password_reset"), {"email": address})
        assert response.status_code == 302
    [message] = mail.outbox
    assert message.to == [eve.email] and "Set your password" in message.subject
    [link] = re.findall(r"https?://\S+/admin/reset/\S+", message.body)
    path = link.split("testserver", 1)[1]
    form = client.get(path, follow=True)
    assert form.status_code == 200
    done = client.post(
        form.redirect_chain[-1][0],
        {"new_password1": PASSWORD, "new_password2": PASSWORD},
    )
    assert done.status_code == 302
    assert get_user_model().objects.get(pk=eve.pk).check_password(PASSWORD)
    assert Client().login(username=eve.username, password=PASSWORD)


def test_a_feature_owners_dashboard_shows_their_feature(
    world: World, cy: Any, limits: dict[str, Limit]
) -> None:
    FeatureFactory(tenant=world.tenant, slug="other")
    page = logged_in(cy).get("/admin/").content.decode()
    assert "acme / chat: 10 requests per day" in page
    assert "acme / batch" not in page and "acme: 50 requests per day" not in page
