"""The alerts admin as owners use it: their channels, rules, alert history and deliveries,
never another tenant's; a "send test alert" action; platform rows for superusers only."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from django.db.models import Model
from pytest_httpserver import HTTPServer

from alerts.models import Alert, AlertRule, Channel, Delivery, Notification
from tests.console.test_scoping import changelist_ids, form_errors, login, url
from tests.factories import FeatureFactory, TenantFactory, TenantOwnerFactory, UserFactory

MARKER = "acme-hidden"
NOW = datetime(2030, 1, 1, tzinfo=UTC)


@dataclass
class Rows:
    channel: Channel
    rule: AlertRule
    alert: Alert
    delivery: Delivery


@dataclass
class World:
    a: Any
    b: Any
    root: Any
    theirs: Rows
    own: Rows
    platform: Rows


def rows(tenant: Any, feature: Any, name: str, url_: str = "https://hooks.example/x") -> Rows:
    channel = Channel.objects.create(
        tenant=tenant, feature=feature, name=f"{name}-slack", kind="slack", target=url_
    )
    rule = AlertRule(tenant=tenant, kind="refusal_spike")  # saved only with a tenant
    if tenant is not None:
        rule.save()
    notification = Notification.objects.create(
        group=f"{name}", window_start=NOW, tenant=tenant, feature=feature, created_at=NOW
    )
    alert = Alert.objects.create(
        key=f"{name}-key",
        kind="threshold",
        subject=f"limit:{name}",
        level=0.8,
        tenant=tenant,
        feature=feature,
        fired_at=NOW,
        details={"limit_name": f"{name} budget"},
        fired_in=notification,
    )
    delivery = Delivery.objects.create(
        notification=notification,
        channel=channel,
        tenant=tenant,
        kind="slack",
        target=f"{name}.example",
        status="sent",
        created_at=NOW,
    )
    return Rows(channel, rule, alert, delivery)


@pytest.fixture
def world(db: None) -> World:
    a = TenantOwnerFactory(username="a@acme.example")
    b = TenantOwnerFactory(username="b@bravo.example")
    root = UserFactory(username="root@example.com", is_superuser=True)
    tenant_a, tenant_b = TenantFactory(slug=MARKER), TenantFactory(slug="bravo")
    tenant_a.owners.add(a)
    tenant_b.owners.add(b)
    feature_a = FeatureFactory(tenant=tenant_a, slug=f"{MARKER}-chat")
    feature_b = FeatureFactory(tenant=tenant_b, slug="report", owner=b)
    theirs = rows(tenant_a, feature_a, MARKER)
    own = rows(tenant_b, feature_b, "bravo")
    platform = rows(None, None, f"{MARKER}-platform")
    return World(a, b, root, theirs, own, platform)


MODELS: list[tuple[type[Model], str]] = [
    (Channel, "channel"),
    (AlertRule, "rule"),
    (Alert, "alert"),
    (Delivery, "delivery"),
]


@pytest.mark.parametrize(("model", "field"), MODELS)
def test_owners_see_their_tenants_rows_only(world: World, model: type[Model], field: str) -> None:
    client = login(world.b)
    response = client.get(url(model, "changelist"))
    assert response.status_code == 200
    assert changelist_ids(response) == {getattr(world.own, field).pk}
    assert MARKER not in response.content.decode()
    theirs = getattr(world.theirs, field)
    assert client.get(url(theirs, "change")).status_code == 302  # "does not exist"
    assert client.get(url(getattr(world.own, field), "change")).status_code == 200


@pytest.mark.parametrize(("model", "field"), MODELS)
def test_superusers_see_every_row(world: World, model: type[Model], field: str) -> None:
    response = login(world.root).get(url(model, "changelist"))
    expected = {getattr(world.theirs, field).pk, getattr(world.own, field).pk}
    assert expected <= changelist_ids(response)


def test_alert_history_shows_delivery_status(world: World) -> None:
    page = login(world.b).get(url(Alert, "changelist")).content.decode()
    assert "bravo budget" in page
    assert "slack bravo.example: sent" in page


def test_history_is_read_only(world: World) -> None:
    client = login(world.b)
    assert client.get(url(Alert, "add")).status_code == 403
    page = client.get(url(world.own.alert, "change"))
    assert page.context["has_change_permission"] is False


def test_owner_cannot_put_a_channel_in_another_tenant_or_the_platform(world: World) -> None:
    client = login(world.b)
    data = {"name": "sneaky", "kind": "slack", "target": "https://hooks.example/y"}
    theirs = client.post(url(Channel, "add"), {**data, "tenant": world.theirs.channel.tenant_id})
    assert "tenant" in form_errors(theirs)
    platform = client.post(url(Channel, "add"), data)
    assert "tenant" in form_errors(platform)
    assert not Channel.objects.filter(name="sneaky").exists()


def test_owner_adds_a_webhook_channel_and_gets_a_signing_secret(world: World) -> None:
    client = login(world.b)
    data = {"name": "hook", "kind": "webhook", "target": "https://hooks.example/z"}
    response = client.post(url(Channel, "add"), {**data, "tenant": world.own.channel.tenant_id})
    assert response.status_code == 302, form_errors(response)
    assert len(Channel.objects.get(name="hook").secret) == 64


def test_the_kind_choices_come_from_the_transport_registry(world: World) -> None:
    form = login(world.b).get(url(Channel, "add")).context["adminform"].form
    assert [value for value, _ in form.fields["kind"].choices if value] == [
        "email",
        "slack",
        "webhook",
    ]


def test_send_test_alert_action(world: World, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/hook").respond_with_data("ok")
    Channel.objects.filter(pk=world.own.channel.pk).update(target=httpserver.url_for("/hook"))
    client = login(world.b)
    response = client.post(
        url(Channel, "changelist"),
        {"action": "send_test_alert", "_selected_action": [world.own.channel.pk]},
        follow=True,
    )
    assert "Test alert sent to bravo-slack." in response.content.decode()
    assert len(httpserver.log) == 1
    assert Delivery.objects.filter(purpose="test", status="sent").count() == 1


def test_send_test_alert_never_reaches_another_tenants_channel(
    world: World, httpserver: HTTPServer
) -> None:
    Channel.objects.filter(pk=world.theirs.channel.pk).update(target=httpserver.url_for("/hook"))
    login(world.b).post(
        url(Channel, "changelist"),
        {"action": "send_test_alert", "_selected_action": [world.theirs.channel.pk]},
    )
    assert httpserver.log == []
    assert not Delivery.objects.filter(purpose="test").exists()


def test_a_failed_test_alert_says_why(world: World, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/hook").respond_with_data("invalid_payload", status=400)
    Channel.objects.filter(pk=world.own.channel.pk).update(target=httpserver.url_for("/hook"))
    response = login(world.b).post(
        url(Channel, "changelist"),
        {"action": "send_test_alert", "_selected_action": [world.own.channel.pk]},
        follow=True,
    )
    assert "Test alert to bravo-slack failed: HTTP 400: invalid_payload" in (
        response.content.decode()
    )


def test_platform_rows_are_for_superusers(world: World) -> None:
    root = login(world.root)
    assert world.platform.alert.pk in changelist_ids(root.get(url(Alert, "changelist")))
    owner = login(world.b)
    assert world.platform.alert.pk not in changelist_ids(owner.get(url(Alert, "changelist")))
    assert owner.get(url(world.platform.channel, "change")).status_code == 302


@pytest.mark.parametrize("who", ["b", "root"])
def test_every_alerts_admin_page_renders(world: World, who: str) -> None:
    client = login(getattr(world, who))
    for model, field in MODELS:
        obj = getattr(world.own, field)
        assert client.get(url(model, "changelist")).status_code == 200
        assert client.get(url(obj, "change")).status_code == 200
    assert client.get(url(Channel, "add")).status_code == 200
    assert client.get(url(AlertRule, "add")).status_code == 200
