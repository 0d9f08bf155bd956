"""Scheduled admission through the HTTP API: `max_wait_ms`, the `scheduled` answer, reading
and committing a scheduled reservation (the engine's side: tests/quotas/engine/test_line.py)."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from quotas.plan import plans
from quotas.reservations import get_engine
from tests.fixtures import World

CAP = 60_000


@pytest.fixture
def dry(world: World, reserve: Callable[..., Any]) -> Callable[..., Any]:
    """A pool of 60,000 tokens a minute, emptied by one call; the engine's clock stopped."""
    world.limit(pool=world.pool, metric="tokens", amount=CAP)
    engine = get_engine()
    engine.frozen_ms = engine.now_ms()
    assert reserve(input_tokens=CAP - 100, max_output_tokens=100).status_code == 201
    return reserve


@pytest.mark.parametrize("value", [-1, 300_001, "soon", 1.5, True])
def test_a_bad_max_wait_is_a_json_400_naming_the_field(
    reserve: Callable[..., Any], value: Any
) -> None:
    response = reserve(max_wait_ms=value)
    assert response.status_code == 400
    assert response["Content-Type"].startswith("application/json")
    assert "max_wait_ms" in response.json()["fields"]


def test_a_caller_that_may_wait_is_scheduled_then_held(dry: Callable[..., Any]) -> None:
    response = dry(input_tokens=900, max_output_tokens=100, max_wait_ms=5_000)
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["status"] == "scheduled"
    assert body["wait_ms"] == 1_000
    assert body["start_at"] and body["expires_at"] > body["start_at"]
    assert body["reserved"]["output_tokens"] == 100 and body["limits"]


def test_reading_and_committing_a_scheduled_reservation(
    world: World, dry: Callable[..., Any]
) -> None:
    body = dry(input_tokens=900, max_output_tokens=100, max_wait_ms=5_000).json()
    client, engine = world.client(), get_engine()
    url = f"/api/v1/reservations/{body['id']}"
    seen = client.get(url).json()
    assert seen["status"] == "scheduled" and seen["wait_ms"] == 1_000
    early = client.post(url + "/commit", {"input_tokens": 900, "output_tokens": 50}, "json")
    assert early.status_code == 409
    assert early.json()["wait_ms"] == 1_000 and early["Retry-After"] == "1"
    assert engine.frozen_ms is not None
    engine.frozen_ms += 1_000
    assert client.get(url).json()["status"] == "held"
    done = client.post(url + "/commit", {"input_tokens": 900, "output_tokens": 50}, "json")
    assert done.status_code == 200 and done.json()["status"] == "committed"


def test_a_wait_past_max_wait_is_todays_429(dry: Callable[..., Any]) -> None:
    response = dry(input_tokens=4_900, max_output_tokens=100, max_wait_ms=4_999)
    assert response.status_code == 429
    assert response.json()["error"] == "rate_limited" and response["Retry-After"] == "5"


def test_the_pool_setting_bounds_the_line(world: World, dry: Callable[..., Any]) -> None:
    world.pool.line_minutes = Decimal("0.1")  # 6,000 tokens
    world.pool.save()
    plans.clear()
    assert dry(input_tokens=5_900, max_output_tokens=100, max_wait_ms=60_000).status_code == 201
    refused = dry(input_tokens=900, max_output_tokens=100, max_wait_ms=60_000)
    assert refused.status_code == 429


def test_a_paused_feature_is_never_scheduled(world: World, dry: Callable[..., Any]) -> None:
    world.chat.status = "paused"
    world.chat.save()
    plans.clear()
    response = dry(input_tokens=900, max_output_tokens=100, max_wait_ms=60_000)
    assert response.status_code == 423
