"""The journeys of the people alerts are sent to, in a real browser with a real SMTP server:
an owner named in one step (no staff flag, no group, no password) sets a password by e-mail,
follows the alert's link, lands on what it names, boosts it and sees the alert resolve. A
feature's owner does it for their feature, a tenant's owner for a tenant-wide budget; a
feature's owner does not see another feature's keys, and a page they may not see says so.

Every page is photographed at 1280x800 and must not scroll sideways (the `shot` fixture)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import override_settings

from alerts.models import Alert, AlertRule
from alerts.services import alerts_run
from quotas.keys import api_key_create
from quotas.models import Limit
from quotas.store import get_engine
from tests.alerts.test_budgets import at
from tests.alerts.test_support import Inbox, smtp_inbox
from tests.factories import FeatureFactory, UserFactory
from tests.fixtures import World

pytestmark = pytest.mark.django_db(transaction=True)

__all__ = ["smtp_inbox"]  # a fixture of these tests
NEW_PASSWORD = "a-long-enough-passphrase-7"
LINK = re.compile(r"https?://\S+")


@pytest.fixture
def site(live_server: Any) -> Iterator[None]:
    """Links in alerts and reset mails point at the live server."""
    with override_settings(SITE_URL=str(live_server.url)):
        yield


@pytest.fixture
def morning(world: World) -> int:
    """One moment of the tenant's morning for the engine and the alert runs: no daily budget
    period ends during the test, and no forecast rule adds its own mail."""
    AlertRule.objects.create(tenant=world.tenant, kind="forecast", enabled=False)
    now = at(9)
    get_engine().frozen_ms = now
    return now


def person(email: str) -> Any:
    """An account as the config file makes one: no password, no staff flag, no group."""
    user = UserFactory(username=email, email=email, is_staff=False)
    user.set_unusable_password()
    user.save()
    return user


def use_up(reserve: Any, *, feature: str, calls: int) -> None:
    for _ in range(calls):
        response = reserve(feature=feature)
        assert response.status_code == 201, response.json()


def links(mail: Any) -> list[str]:
    return [link.rstrip(".,)>") for link in LINK.findall(mail.part("text/plain"))]


def set_password_by_mail(page: Any, inbox: Any, user: Any, shot: Any) -> None:
    """The login page's reset link, the mail, the new password, the login."""
    page.goto("/admin/login/")
    page.get_by_role("link", name="Forgotten your login credentials?").click()
    shot(page, "password reset")
    page.fill("#id_email", user.email)
    page.get_by_role("button", name="Reset my password").click()
    page.wait_for_url("**/password_reset/done/")
    [mail] = [m for m in inbox.to(user.email) if "password" in m.subject.lower()]
    [reset] = [link for link in links(mail) if "/reset/" in link]
    page.goto(reset)
    shot(page, "new password")
    page.fill("#id_new_password1", NEW_PASSWORD)
    page.fill("#id_new_password2", NEW_PASSWORD)
    page.get_by_role("button", name="Change my password").click()
    page.wait_for_url("**/reset/done/")
    page.get_by_role("link", name="Log in").click()
    page.fill("#id_username", user.get_username())
    page.fill("#id_password", NEW_PASSWORD)
    page.locator('#login-form [type="submit"]').click()
    page.locator("#user-tools").wait_for()


def boost_from_feature_page(page: Any, limit: Limit, amount: int, shot: Any) -> None:
    page.locator(f'tr[data-limit-id="{limit.pk}"]').get_by_role("link", name="boost").click()
    page.wait_for_url(f"**/admin/quotas/limit/{limit.pk}/boost/")
    shot(page, "boost form")
    page.fill("#id_amount", str(amount))
    page.get_by_role("button", name="Boost").click()
    page.locator(".messagelist").wait_for()


def test_a_feature_owner_follows_the_alert_boosts_and_sees_it_resolve(
    page: Any,
    world: World,
    reserve: Any,
    site: None,
    morning: int,
    smtp_inbox: Inbox,
    shot: Any,
    js_errors: list[str],
) -> None:
    cy = person("cy@globex.example")
    world.chat.owner = cy  # the one step that makes an owner
    world.chat.save()
    daily = world.limit(
        tenant=world.tenant, feature=world.chat, metric="requests", window="day", amount=4
    )
    use_up(reserve, feature="chat", calls=4)
    alerts_run(now_ms=morning)
    [alert_mail] = smtp_inbox.to(cy.email)
    [alert_link, *_] = [link for link in links(alert_mail) if "/admin/" in link]

    set_password_by_mail(page, smtp_inbox, cy, shot)
    shot(page, "dashboard")
    assert page.locator("#closest").get_by_text("acme / chat: 4 requests per day").is_visible()

    response = page.goto(alert_link)
    assert response is not None and response.status == 200, (alert_link, response)
    shot(page, "the alert's link")
    if f"/admin/tenants/feature/{world.chat.pk}/" not in page.url:  # a limit's page
        page.get_by_role("link", name="acme/chat").first.click()
    page.wait_for_url(f"**/admin/tenants/feature/{world.chat.pk}/change/")
    shot(page, "feature")
    assert page.locator(f'tr[data-limit-id="{daily.pk}"] .console-used').inner_text() == "4"

    boost_from_feature_page(page, daily, 10, shot)
    shot(page, "boosted")
    assert "boosted to 10" in page.locator(".messagelist").inner_text()

    alerts_run(now_ms=morning + 11 * 60_000)  # past any storm window
    assert not Alert.objects.filter(limit=daily, state="firing").exists()
    page.goto("/admin/alerts/alert/")
    shot(page, "alerts resolved")
    assert "resolved" in page.locator("#result_list").inner_text().lower()
    assert [m for m in smtp_inbox.to(cy.email) if "resolved" in m.part("text/plain").lower()]
    assert js_errors == []


def test_a_tenant_owner_boosts_the_tenants_budget_from_the_alert(
    page: Any,
    world: World,
    reserve: Any,
    site: None,
    morning: int,
    smtp_inbox: Inbox,
    shot: Any,
    js_errors: list[str],
) -> None:
    dee = person("dee@acme.example")
    world.tenant.owners.add(dee)  # the one step
    tenant_daily = world.limit(tenant=world.tenant, metric="requests", window="day", amount=3)
    use_up(reserve, feature="chat", calls=2)
    use_up(reserve, feature="batch", calls=1)
    alerts_run(now_ms=morning)
    [alert_mail] = smtp_inbox.to(dee.email)
    [alert_link, *_] = [link for link in links(alert_mail) if "/admin/" in link]

    set_password_by_mail(page, smtp_inbox, dee, shot)
    response = page.goto(alert_link)
    assert response is not None and response.status == 200, (alert_link, response)
    shot(page, "the alert's link")
    page.goto(f"/admin/tenants/tenant/{world.tenant.pk}/change/")
    shot(page, "tenant")
    assert page.locator(f'tr[data-limit-id="{tenant_daily.pk}"] .console-used').inner_text() == "3"
    boost_from_feature_page(page, tenant_daily, 30, shot)

    alerts_run(now_ms=morning + 11 * 60_000)
    assert not Alert.objects.filter(limit=tenant_daily, state="firing").exists()
    page.goto("/admin/alerts/alert/")
    shot(page, "alerts resolved")
    assert "resolved" in page.locator("#result_list").inner_text().lower()
    assert js_errors == []


def test_a_feature_owner_sees_only_their_features_keys(
    page: Any, world: World, make_user: Any, login: Any, shot: Any
) -> None:
    cy = make_user("cy@globex.example")
    cy.groups.clear()
    cy.is_staff = False
    cy.save()
    world.chat.owner = cy
    world.chat.save()
    theirs = api_key_create(tenant=world.tenant, name="chat-bot", features=[world.chat]).api_key
    other = FeatureFactory(tenant=world.tenant, slug="ledger-sync")
    foreign = api_key_create(tenant=world.tenant, name="sync-job", features=[other]).api_key

    login(page, cy)
    page.goto("/admin/quotas/apikey/")
    shot(page, "keys")
    names = page.locator("#result_list tbody th").all_inner_texts()
    assert any("chat-bot" in name for name in names), names
    assert not any("sync-job" in name or name.strip() == "test" for name in names), names
    assert "revoked" in page.locator("#result_list thead").inner_text().lower()

    page.goto(f"/admin/quotas/apikey/{foreign.pk}/change/")
    shot(page, "another feature's key")
    assert "sync-job" not in page.locator("#content").inner_text()

    page.goto(f"/admin/quotas/apikey/{theirs.pk}/change/")
    page.get_by_role("link", name="Revoke").click()
    shot(page, "confirm revoke")
    page.get_by_role("button", name="Yes, revoke it").click()
    page.locator(".messagelist").wait_for()
    theirs.refresh_from_db()
    assert theirs.revoked_at is not None

    response = page.goto("/admin/tenants/tenant/add/")
    shot(page, "not theirs to see")
    assert response is not None and response.status == 403
    assert page.locator("#permission-denied").is_visible()
    assert page.get_by_role("link", name="Your dashboard").is_visible()


CONSOLE_PAGES = [
    "/admin/",
    "/admin/tenants/tenant/",
    "/admin/tenants/feature/",
    "/admin/tenants/feature/add/",
    "/admin/quotas/limit/",
    "/admin/quotas/limit/add/",
    "/admin/quotas/apikey/",
    "/admin/providers/pool/",
    "/admin/providers/provider/",
    "/admin/providers/languagemodel/",
    "/admin/alerts/alert/",
    "/admin/alerts/alertrule/",
    "/admin/alerts/channel/",
    "/admin/alerts/delivery/",
    "/admin/ledger/usageevent/",
    "/admin/ledger/refusal/",
    "/admin/ledger/usagerollup/",
    "/admin/ledger/deadletter/",
]


def test_every_console_page_fits_a_laptop(
    page: Any, world: World, reserve: Any, make_user: Any, login: Any, shot: Any
) -> None:
    """The platform's view (a superuser sees every column there is), page by page."""
    daily = world.limit(
        tenant=world.tenant, feature=world.chat, metric="cost_usd", window="day", amount=5
    )
    assert reserve().status_code == 201
    login(page, make_user("root@example.com", superuser=True))
    pages = [
        *CONSOLE_PAGES,
        f"/admin/tenants/tenant/{world.tenant.pk}/change/",
        f"/admin/tenants/feature/{world.chat.pk}/change/",
        f"/admin/quotas/limit/{daily.pk}/change/",
        f"/admin/quotas/limit/{daily.pk}/boost/",
        f"/admin/providers/pool/{world.pool.pk}/change/",
    ]
    for path in pages:
        response = page.goto(path)
        assert response is not None and response.status == 200, (path, response)
        shot(page, path)  # asserts the page does not scroll sideways


def test_a_limit_form_shows_only_the_fields_of_its_window(
    page: Any, world: World, make_user: Any, login: Any, shot: Any
) -> None:
    minute = world.limit(tenant=world.tenant, feature=world.chat, metric="tokens", amount=1_000)
    login(page, make_user("root@example.com", superuser=True))
    page.goto(f"/admin/quotas/limit/{minute.pk}/change/")
    shot(page, "a minute limit")
    assert page.locator(".field-alert_at").is_hidden()
    assert page.locator(".field-guaranteed").is_visible()

    page.select_option("#id_window", "day")
    shot(page, "now a day budget")
    assert page.locator(".field-alert_at").is_visible()
    assert page.locator(".field-guaranteed").is_hidden()
    page.fill("#id_alert_at", "50, 90")
    page.get_by_role("button", name="Save and continue editing").click()
    page.locator(".messagelist").wait_for()
    minute.refresh_from_db()
    assert (minute.window, minute.alert_at) == ("day", [0.5, 0.9])
    assert page.locator("#id_alert_at").input_value() == "50, 90"

    page.goto(f"/admin/tenants/feature/{world.chat.pk}/change/")
    shot(page, "the feature's limits inline")
    row = page.locator("#limits-0")
    assert row.locator('[name="limits-0-alert_at"]').is_visible()
    assert row.locator('[name="limits-0-guaranteed"]').is_hidden()
