"""Transports against real servers on the loopback interface: an SMTP server (aiosmtpd)
and an HTTP server (pytest-httpserver) standing in for Slack and webhook receivers."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from alerts.models import Channel, Delivery
from alerts.services import channel_test
from alerts.transports import (
    SIGNATURE_HEADER,
    Message,
    WebhookTransport,
    webhook_signature_verify,
)
from tests.alerts import test_support as support
from tests.alerts.test_support import Inbox
from tests.fixtures import World

smtp_inbox, fast_retries = support.smtp_inbox, support.fast_retries

pytestmark = pytest.mark.usefixtures("fast_retries")


def channel(world: World, kind: str, target: str = "", **fields: Any) -> Channel:
    made = Channel(tenant=world.tenant, name=f"{kind}-channel", kind=kind, target=target, **fields)
    made.full_clean()
    made.save()
    return made


def test_email_reaches_a_real_smtp_server(world: World, smtp_inbox: Inbox) -> None:
    ops = channel(world, "email", "ops@acme.example, oncall@acme.example")
    delivery = channel_test(channel_id=ops.pk)
    assert delivery.status == Delivery.Status.SENT, delivery.error
    [mail] = smtp_inbox.received
    assert sorted(mail.recipients) == ["oncall@acme.example", "ops@acme.example"]
    assert mail.subject == "[LLM quota] Test alert: channel email-channel"
    assert 'test alert for the channel "email-channel"' in mail.part("text/plain")
    assert "<strong>email-channel</strong>" in mail.part("text/html")
    assert delivery.duration_ms is not None and delivery.attempts == 1


def test_an_email_channel_without_addresses_writes_to_the_owner(
    world: World, smtp_inbox: Inbox
) -> None:
    mine = channel(world, "email", feature=world.chat)
    assert channel_test(channel_id=mine.pk).status == Delivery.Status.SENT
    assert [m.recipients for m in smtp_inbox.received] == [[world.chat.owner.email]]


def test_an_address_the_mail_server_does_not_know_disables_the_channel(
    world: World, smtp_inbox: Inbox
) -> None:
    smtp_inbox.unknown.add("left@acme.example")
    gone = channel(world, "email", "left@acme.example", feature=world.chat)
    delivery = channel_test(channel_id=gone.pk)
    assert (delivery.status, delivery.permanent) == ("failed", True)
    assert "550" in delivery.error
    gone.refresh_from_db()
    assert not gone.enabled
    assert [m.recipients for m in smtp_inbox.received] == [[world.chat.owner.email]]


def test_slack_gets_a_block_kit_message(world: World, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/services/T0/B0/x", method="POST").respond_with_data("ok")
    slack = channel(world, "slack", httpserver.url_for("/services/T0/B0/x"))
    delivery = channel_test(channel_id=slack.pk)
    assert delivery.status == Delivery.Status.SENT, delivery.error
    assert delivery.target == f"{httpserver.host}:{httpserver.port}"  # never the hook's path
    request, _ = httpserver.log[0]
    assert request.headers["Content-Type"] == "application/json"
    payload = request.get_json()
    assert payload["text"] == "[LLM quota] Test alert: channel slack-channel"
    assert [b["type"] for b in payload["blocks"]] == ["header", "section", "context"]
    assert "*slack-channel*" in payload["blocks"][1]["text"]["text"]


def test_a_webhook_is_signed_with_hmac_sha256(world: World, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/hook", method="POST").respond_with_data("", status=204)
    hook = channel(world, "webhook", httpserver.url_for("/hook"))
    assert len(hook.secret) == 64  # generated on creation
    assert channel_test(channel_id=hook.pk).status == Delivery.Status.SENT
    request, _ = httpserver.log[0]
    body, header = request.get_data(), request.headers[SIGNATURE_HEADER]
    assert json.loads(body)["type"] == "test"
    assert webhook_signature_verify(hook.secret, header, body, now=time.time())
    assert not webhook_signature_verify(hook.secret, header, body + b" ", now=time.time())
    assert not webhook_signature_verify("another secret", header, body, now=time.time())
    assert not webhook_signature_verify(hook.secret, header, body, now=time.time() + 3600)


def test_the_signature_covers_the_timestamp_it_states(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/hook").respond_with_data("")
    transport = WebhookTransport(target=httpserver.url_for("/hook"), secret="s3cret")
    transport.clock = lambda: 1_700_000_000.0  # type: ignore[method-assign]
    transport.notify(Message("s", "t", "h", {}, {"a": 1}))
    request, _ = httpserver.log[0]
    assert request.headers[SIGNATURE_HEADER].startswith("t=1700000000,v1=")
    assert webhook_signature_verify(
        "s3cret", request.headers[SIGNATURE_HEADER], request.get_data(), now=1_700_000_100
    )


def flaky(statuses: list[int]) -> Any:
    """A handler answering each status in turn, then 200."""
    answers = iter(statuses)

    def handler(request: Request) -> Response:
        return Response("oops" if (status := next(answers, 200)) != 200 else "ok", status=status)

    return handler


def test_5xx_is_retried_until_it_succeeds(world: World, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/hook").respond_with_handler(flaky([500, 503]))
    hook = channel(world, "webhook", httpserver.url_for("/hook"))
    delivery = channel_test(channel_id=hook.pk)
    assert (delivery.status, delivery.attempts) == (Delivery.Status.SENT, 3)
    assert len(httpserver.log) == 3


def test_retries_are_bounded_and_a_5xx_does_not_disable(
    world: World, httpserver: HTTPServer
) -> None:
    httpserver.expect_request("/hook").respond_with_data("down", status=502)
    slack = channel(world, "slack", httpserver.url_for("/hook"))
    delivery = channel_test(channel_id=slack.pk)
    assert (delivery.status, delivery.attempts, delivery.permanent) == ("failed", 3, False)
    assert "HTTP 502" in delivery.error
    slack.refresh_from_db()
    assert slack.enabled


@pytest.mark.parametrize(
    ("kind", "status", "body"),
    [
        ("slack", 404, "no_service"),
        ("slack", 410, "no_service"),
        ("slack", 403, "channel_is_archived"),
        ("webhook", 410, "gone"),
    ],
)
def test_a_permanent_failure_disables_the_channel_and_tells_the_owner(
    world: World, httpserver: HTTPServer, smtp_inbox: Inbox, kind: str, status: int, body: str
) -> None:
    httpserver.expect_request("/hook").respond_with_data(body, status=status)
    gone = channel(world, kind, httpserver.url_for("/hook"), feature=world.chat)
    delivery = channel_test(channel_id=gone.pk)
    assert (delivery.status, delivery.permanent, delivery.attempts) == ("failed", True, 1)
    gone.refresh_from_db()
    assert not gone.enabled and body in gone.disabled_reason
    [mail] = smtp_inbox.received
    assert mail.recipients == [world.chat.owner.email]
    assert mail.subject == f'[LLM quota] Alert channel "{kind}-channel" was disabled'
    assert body in mail.part("text/plain")
    notice = Delivery.objects.get(purpose="channel_disabled")
    assert (notice.status, notice.channel) == ("sent", None)


def test_a_client_error_fails_without_retrying_or_disabling(
    world: World, httpserver: HTTPServer
) -> None:
    httpserver.expect_request("/hook").respond_with_data("bad", status=400)
    hook = channel(world, "webhook", httpserver.url_for("/hook"))
    delivery = channel_test(channel_id=hook.pk)
    assert (delivery.status, delivery.attempts, delivery.permanent) == ("failed", 1, False)
    hook.refresh_from_db()
    assert hook.enabled


def test_an_unreachable_target_is_retried_then_recorded(world: World) -> None:
    hook = channel(world, "webhook", "http://127.0.0.1:9/hook")  # discard port: refused
    delivery = channel_test(channel_id=hook.pk)
    assert (delivery.status, delivery.attempts) == ("failed", 3)
    assert "ConnectError" in delivery.error


def test_targets_are_validated_by_their_transport(world: World) -> None:
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError, match="not an http"):
        channel(world, "slack", "hooks.slack.com/no-scheme")
    with pytest.raises(ValidationError, match="not an e-mail address"):
        channel(world, "email", "ops@acme.example, nobody")
