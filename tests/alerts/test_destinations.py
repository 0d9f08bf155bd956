"""Alert webhooks post only to public addresses unless ALERTS_HTTP_ALLOWED_NETWORKS allows
more: an owner's URL must not reach the platform's own network (SSRF)."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.test import override_settings
from pytest_httpserver import HTTPServer

from alerts.destinations import DestinationRefused, destination_check
from alerts.transports import Message, TransportError, WebhookTransport

MESSAGE = Message(subject="s", text="t", html="h", slack={}, data={"alert": 1})
ONLY_PUBLIC = override_settings(ALERTS_HTTP_ALLOWED_NETWORKS="")


@ONLY_PUBLIC
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/",  # the platform's own Redis
        "http://localhost:5432/",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://169.254.169.254/latest/meta-data/",  # a cloud's metadata endpoint
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://100.64.0.1/hook",  # shared address space
    ],
)
def test_a_channel_to_a_non_public_address_is_refused_when_saved(url: str) -> None:
    with pytest.raises(ValidationError, match="non-public address"):
        WebhookTransport.validate_target(url)


@ONLY_PUBLIC
def test_public_addresses_and_names_pass_the_save_check() -> None:
    WebhookTransport.validate_target("https://203.0.113.7.nip.example/hook")
    WebhookTransport.validate_target("https://8.8.8.8/hook")
    destination_check("https://hooks.slack.com/services/x", resolve=False)


@ONLY_PUBLIC
def test_nothing_is_posted_to_a_non_public_address_and_the_failure_is_permanent(
    httpserver: HTTPServer,
) -> None:
    httpserver.expect_request("/hook").respond_with_data("ok")

    with pytest.raises(TransportError, match="non-public address") as refused:
        WebhookTransport(target=httpserver.url_for("/hook"), secret="s").send_once(MESSAGE)

    assert refused.value.permanent
    assert httpserver.log == []


@ONLY_PUBLIC
def test_a_name_resolving_to_a_private_address_is_refused_before_posting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        "alerts.destinations.socket.getaddrinfo",
        lambda host, *a, **k: [(2, 1, 6, "", ("10.0.0.5", 0))],
    )
    with pytest.raises(DestinationRefused, match=r"10\.0\.0\.5"):
        destination_check("https://innocent.example/hook", resolve=True)


@override_settings(ALERTS_HTTP_ALLOWED_NETWORKS="127.0.0.0/8")
def test_allowed_networks_let_a_relay_on_the_own_network_through(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/hook").respond_with_data("ok")

    WebhookTransport(target=httpserver.url_for("/hook"), secret="s").send_once(MESSAGE)

    assert len(httpserver.log) == 1


@ONLY_PUBLIC
@pytest.mark.parametrize(
    ("host", "carried"),
    [
        ("64:ff9b::7f00:1", "127.0.0.1"),  # NAT64, well-known prefix
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
        ("::10.0.0.5", "10.0.0.5"),  # IPv4-compatible
        ("::ffff:0:192.168.1.1", "192.168.1.1"),  # IPv4-translated
        ("::ffff:10.1.2.3", "10.1.2.3"),  # IPv4-mapped
        ("2002:7f00:1::", "127.0.0.1"),  # 6to4
        ("2002:a00:5:1::1", "10.0.0.5"),
    ],
)
def test_ipv6_forms_carrying_a_private_ipv4_address_are_judged_by_it(
    host: str, carried: str
) -> None:
    with pytest.raises(ValidationError, match=rf"non-public address \({carried}\)"):
        WebhookTransport.validate_target(f"http://[{host}]/hook")


@ONLY_PUBLIC
def test_a_name_resolving_to_nat64_of_a_private_address_is_refused_before_posting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        "alerts.destinations.socket.getaddrinfo",
        lambda host, *a, **k: [(10, 1, 6, "", ("64:ff9b::a00:5", 0, 0, 0))],
    )
    with pytest.raises(DestinationRefused, match=r"10\.0\.0\.5"):
        destination_check("https://innocent.example/hook", resolve=True)


@ONLY_PUBLIC
def test_local_use_nat64_addresses_are_refused() -> None:
    with pytest.raises(DestinationRefused, match="local-use NAT64"):
        destination_check("http://[64:ff9b:1::808:808]/hook", resolve=False)


@ONLY_PUBLIC
@pytest.mark.parametrize(
    "host", ["64:ff9b::808:808", "::ffff:0:8.8.8.8", "2002:808:808::1", "2606:4700::1111"]
)
def test_ipv6_forms_carrying_a_public_ipv4_address_pass(host: str) -> None:
    destination_check(f"http://[{host}]/hook", resolve=False)


@override_settings(ALERTS_HTTP_ALLOWED_NETWORKS="::1/128")
def test_an_allowed_ipv6_network_still_matches_the_address_as_written() -> None:
    destination_check("http://[::1]/hook", resolve=False)
