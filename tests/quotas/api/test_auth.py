"""The reservation API's authentication and authorisation: 401 for a
missing, unknown, malformed or revoked key, throttling of failed attempts per address, and
403 for a key narrowed to other features of its tenant."""

from __future__ import annotations

import json
import time
from typing import Any

import django_ratelimit.core
import pytest
from rest_framework.test import APIClient

from quotas.keys import api_key_create, api_key_revoke
from quotas.models import ApiKey
from quotas.plan import plans

RESERVATIONS = "/api/v1/reservations"


def body_of(response: Any, status: int, code: str) -> dict[str, Any]:
    """The JSON error body of a refusal, after checking its status, shape and media type."""
    content_type = response["Content-Type"]
    assert content_type.startswith("application/json"), (content_type, response.content[:200])
    body = json.loads(response.content)
    assert response.status_code == status, body
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    return body


def reserve_body(world: Any, **overrides: Any) -> dict[str, Any]:
    body = {
        "feature": "chat",
        "model": world.model.name,
        "input_tokens": 100,
        "max_output_tokens": 100,
    }
    body.update(overrides)
    return body


def client_with(header: str | None, remote_addr: str = "127.0.0.1") -> APIClient:
    client = APIClient(REMOTE_ADDR=remote_addr)
    if header is not None:
        client.credentials(HTTP_AUTHORIZATION=header)
    return client


# -- 401 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(None, id="no-header"),
        pytest.param("", id="empty-header"),
        pytest.param("Bearer", id="scheme-without-key"),
        pytest.param("Bearer    ", id="scheme-with-blank-key"),
        pytest.param("Basic dXNlcjpwYXNz", id="basic-scheme"),
        pytest.param("Token qk_0123456789ab_secret", id="token-scheme"),
        pytest.param("Bearer qk_0123456789ab_notarealsecret", id="unknown-key"),
        pytest.param("Bearer not-a-key", id="malformed-key"),
        pytest.param("Bearer qk__secret", id="malformed-empty-prefix"),
        pytest.param("Bearer xx_0123456789ab_secret", id="malformed-wrong-scheme"),
    ],
)
def test_reserving_without_a_valid_key_is_unauthenticated(world: Any, header: str | None) -> None:
    response = client_with(header).post(RESERVATIONS, reserve_body(world), format="json")

    body_of(response, 401, "unauthenticated")
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_a_known_prefix_with_the_wrong_secret_is_unauthenticated(world: Any) -> None:
    prefix = world.secret.split("_")[1]
    forged = f"qk_{prefix}_{'x' * 32}"

    response = client_with(f"Bearer {forged}").post(
        RESERVATIONS, reserve_body(world), format="json"
    )

    body_of(response, 401, "unauthenticated")
    assert "WWW-Authenticate" in response


@pytest.mark.parametrize(
    "method,path",
    [
        ("get", "/api/v1/reservations/rsv_000000000000000000000000"),
        ("post", "/api/v1/reservations/rsv_000000000000000000000000/commit"),
        ("post", "/api/v1/reservations/rsv_000000000000000000000000/release"),
        ("post", "/api/v1/reservations/rsv_000000000000000000000000/extend"),
        ("get", "/api/v1/features/chat/usage"),
    ],
)
def test_every_endpoint_refuses_a_request_without_a_key(world: Any, method: str, path: str) -> None:
    response = getattr(client_with(None), method)(path, {}, format="json")

    body_of(response, 401, "unauthenticated")
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_a_revoked_key_is_unauthenticated(world: Any) -> None:
    client = world.client()
    assert client.post(RESERVATIONS, reserve_body(world), format="json").status_code == 201

    api_key_revoke(api_key=ApiKey.objects.get(tenant=world.tenant, name="test"))
    plans.clear()
    response = client.post(RESERVATIONS, reserve_body(world), format="json")

    body = body_of(response, 401, "unauthenticated")
    assert "revoked" in body["message"].lower()
    assert "WWW-Authenticate" in response


def test_a_revoked_key_cannot_read_its_reservations(world: Any) -> None:
    client = world.client()
    rid = client.post(RESERVATIONS, reserve_body(world), format="json").json()["id"]

    api_key_revoke(api_key=ApiKey.objects.get(tenant=world.tenant, name="test"))
    plans.clear()

    body_of(client.get(f"{RESERVATIONS}/{rid}"), 401, "unauthenticated")
    body_of(
        client.post(
            f"{RESERVATIONS}/{rid}/commit",
            {"input_tokens": 1, "output_tokens": 1},
            format="json",
        ),
        401,
        "unauthenticated",
    )


# -- throttling of failed authentication -------------------------------------------------------


@pytest.fixture
def frozen_ratelimit_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep django-ratelimit in one window, so a minute boundary cannot reset the count."""
    window = int(time.time()) + 60
    monkeypatch.setattr(django_ratelimit.core, "_get_window", lambda value, period: window)


@pytest.mark.usefixtures("frozen_ratelimit_window")
def test_more_than_30_failed_attempts_a_minute_from_one_address_are_rate_limited(
    world: Any,
) -> None:
    bad = client_with("Bearer qk_0123456789ab_wrong", remote_addr="10.1.2.3")

    statuses = [
        bad.post(RESERVATIONS, reserve_body(world), format="json").status_code for _ in range(30)
    ]
    throttled = bad.post(RESERVATIONS, reserve_body(world), format="json")

    assert statuses == [401] * 30
    body_of(throttled, 429, "rate_limited")
    assert int(throttled["Retry-After"]) > 0


@pytest.mark.usefixtures("frozen_ratelimit_window")
def test_failed_auth_throttling_spares_a_valid_key_and_other_addresses(world: Any) -> None:
    bad = client_with("Bearer qk_0123456789ab_wrong", remote_addr="10.1.2.3")
    for _ in range(31):
        bad.post(RESERVATIONS, reserve_body(world), format="json")
    body_of(bad.post(RESERVATIONS, reserve_body(world), format="json"), 429, "rate_limited")

    good = client_with(f"Bearer {world.secret}", remote_addr="10.1.2.3")
    elsewhere = client_with("Bearer qk_0123456789ab_wrong", remote_addr="10.9.9.9")

    assert good.post(RESERVATIONS, reserve_body(world), format="json").status_code == 201
    body_of(
        elsewhere.post(RESERVATIONS, reserve_body(world), format="json"), 401, "unauthenticated"
    )


@pytest.mark.usefixtures("frozen_ratelimit_window")
def test_successful_requests_do_not_count_towards_the_failed_auth_throttle(world: Any) -> None:
    good = client_with(f"Bearer {world.secret}", remote_addr="10.1.2.4")
    for _ in range(35):
        assert good.get("/api/v1/features/chat/usage").status_code == 200

    bad = client_with("Bearer qk_0123456789ab_wrong", remote_addr="10.1.2.4")
    body_of(bad.get("/api/v1/features/chat/usage"), 401, "unauthenticated")


# -- 403 ---------------------------------------------------------------------------------------


@pytest.fixture
def chat_only_client(world: Any) -> APIClient:
    issued = api_key_create(tenant=world.tenant, features=[world.chat], name="chat only")
    plans.clear()
    return world.client(issued.secret)


def test_a_key_narrowed_to_chat_may_reserve_for_chat(world: Any, chat_only_client: Any) -> None:
    response = chat_only_client.post(RESERVATIONS, reserve_body(world), format="json")

    assert response.status_code == 201, response.json()


def test_a_key_narrowed_to_chat_may_not_reserve_for_batch(
    world: Any, chat_only_client: Any
) -> None:
    response = chat_only_client.post(
        RESERVATIONS, reserve_body(world, feature="batch"), format="json"
    )

    body_of(response, 403, "forbidden")


def test_a_key_narrowed_to_chat_may_not_read_batch_usage(world: Any, chat_only_client: Any) -> None:
    body_of(chat_only_client.get("/api/v1/features/batch/usage"), 403, "forbidden")
    assert chat_only_client.get("/api/v1/features/chat/usage").status_code == 200


def test_a_key_narrowed_to_chat_may_not_touch_a_batch_reservation(
    world: Any, chat_only_client: Any
) -> None:
    rid = (
        world.client()
        .post(RESERVATIONS, reserve_body(world, feature="batch"), format="json")
        .json()["id"]
    )

    for response in (
        chat_only_client.get(f"{RESERVATIONS}/{rid}"),
        chat_only_client.post(
            f"{RESERVATIONS}/{rid}/commit", {"input_tokens": 1, "output_tokens": 1}, format="json"
        ),
        chat_only_client.post(f"{RESERVATIONS}/{rid}/release", {}, format="json"),
        chat_only_client.post(f"{RESERVATIONS}/{rid}/extend", {"ttl_seconds": 60}, format="json"),
    ):
        assert response.status_code in (403, 404), response.content
        assert response["Content-Type"].startswith("application/json")

    lease = world.client().get(f"{RESERVATIONS}/{rid}").json()
    assert lease["status"] == "held"


# -- the throttle's store ----------------------------------------------------------------------


def test_a_bad_key_is_unauthenticated_even_when_the_throttle_store_is_down(world: Any) -> None:
    from django.test import override_settings

    dead_cache = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
        }
    }
    with override_settings(CACHES=dead_cache):
        response = client_with("Bearer qk_0123456789ab_wrong").post(
            RESERVATIONS, reserve_body(world), format="json"
        )

    assert response.status_code != 500, response.content
    body_of(response, 401, "unauthenticated")
