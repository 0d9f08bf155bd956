"""The usage endpoint's numbers as their unit means them: USD to the nano-dollar, whole
tokens and requests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
from rest_framework.test import APIClient

from quotas.engine import Engine
from quotas.keys import api_key_create
from quotas.plan import plans
from quotas.store import get_engine
from tenants.models import Tenant
from tests.factories import FeatureFactory, TenantFactory


def test_used_is_rounded_to_what_its_unit_means(world: Any, reserve: Any) -> None:
    cost = world.limit(feature=world.chat, metric="cost_usd", window="month", amount="0.001")
    tokens = world.limit(feature=world.chat, metric="tokens", window="day", amount=100_000)
    # 100 input + 1000 output tokens cost 15,000 + 600,000 nano-USD = $0.000615
    assert reserve(input_tokens=100, max_output_tokens=1000).status_code == 201

    response = world.client().get("/api/v1/features/chat/usage")

    limits = {row["id"]: row for row in response.json()["limits"]}
    assert limits[cost.id]["used"] == 0.000615  # not 0.0006150000000000001
    assert limits[tokens.id]["used"] == 1_100 and isinstance(limits[tokens.id]["used"], int)
    assert b'"used":0.000615,' in response.content


# -- on a partitioned store ------------------------------------------------------------------


@pytest.fixture
def three_partitions(settings: Any) -> Iterator[Engine]:
    """The quota state in 3 partitions on the test's Redis, whatever QUOTA_PARTITIONS says;
    shared limits split evenly (the rebalancer does not run here)."""
    settings.QUOTA_PARTITIONS = 3
    get_engine.cache_clear()
    try:
        yield get_engine()
    finally:
        get_engine.cache_clear()


@dataclass
class Neighbour:
    """A second tenant, on another partition than the world's, with a chat feature."""

    tenant: Tenant
    secret: str

    def client(self) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {self.secret}")
        return client


@pytest.fixture
def neighbour(three_partitions: Engine, world: Any) -> Neighbour:
    home = three_partitions.tenant_space(world.tenant.id)
    tenant = cast(Tenant, TenantFactory(slug="globex"))
    while three_partitions.tenant_space(tenant.id) is home:
        tenant = cast(Tenant, TenantFactory())
    FeatureFactory(tenant=tenant, slug="chat", priority="interactive")
    secret = api_key_create(tenant=tenant, name="test").secret
    plans.clear()
    return Neighbour(tenant, secret)


def _reserve(client: APIClient, model: str, tokens: int) -> dict[str, Any]:
    body = {"feature": "chat", "model": model, "input_tokens": tokens // 2}
    response = client.post(
        "/api/v1/reservations", {**body, "max_output_tokens": tokens // 2}, format="json"
    )
    assert response.status_code == 201, response.content
    answer: dict[str, Any] = response.json()
    return answer


def test_the_usage_of_a_shared_limit_is_summed_over_the_partitions(
    three_partitions: Engine, world: Any, neighbour: Neighbour
) -> None:
    minute = world.limit(pool=world.pool, metric="tokens", amount=90_000)
    day = world.limit(pool=world.pool, metric="tokens", window="day", amount=3_000_000)
    own = world.limit(tenant=world.tenant, metric="tokens", window="day", amount=50_000)
    three_partitions.frozen_ms = three_partitions.now_ms()  # no refill between the reads
    _reserve(world.client(), world.model.name, 1_000)
    _reserve(neighbour.client(), world.model.name, 2_000)

    for client in (world.client(), neighbour.client()):
        rows = client.get("/api/v1/features/chat/usage").json()["limits"]
        limits = {row["id"]: row for row in rows}
        # each tenant's decisions took from its own partition's allotment; both are counted
        assert (limits[minute.id]["limit"], limits[minute.id]["used"]) == (90_000, 3_000)
        assert limits[minute.id]["remaining"] == 87_000
        # the latest partition to be full again: 2,000 tokens at its 30,000 a minute
        assert limits[minute.id]["reset_seconds"] == 4
        assert (limits[day.id]["limit"], limits[day.id]["used"]) == (3_000_000, 3_000)
        assert limits[day.id]["remaining"] == 2_997_000
    mine = world.client().get("/api/v1/features/chat/usage").json()["limits"]
    assert {row["id"]: row["used"] for row in mine}[own.id] == 1_000  # its own, not summed


def test_a_reservation_answers_a_shared_limit_with_its_whole_amount(
    three_partitions: Engine, world: Any, neighbour: Neighbour
) -> None:
    minute = world.limit(pool=world.pool, metric="tokens", amount=90_000)
    three_partitions.frozen_ms = three_partitions.now_ms()

    answer = _reserve(world.client(), world.model.name, 1_000)

    (shown,) = [row for row in answer["limits"] if row["id"] == minute.id]
    assert shown["limit"] == 90_000  # the amount, not this partition's 30,000
    assert shown["remaining"] == 29_000  # what this partition can still admit


def test_a_refusal_by_a_shared_limit_names_its_whole_amount(
    three_partitions: Engine, world: Any, neighbour: Neighbour
) -> None:
    minute = world.limit(pool=world.pool, metric="tokens", amount=90_000)

    refused = world.client().post(
        "/api/v1/reservations",
        {
            "feature": "chat",
            "model": world.model.name,
            "input_tokens": 20_000,
            "max_output_tokens": 20_000,
        },
        format="json",
    )

    assert refused.status_code == 429  # 40,000 tokens: more than this partition's 30,000
    assert refused.json()["limit"]["id"] == minute.id
    assert refused.json()["retry_after_ms"] is not None  # the rebalancer may move units here
    assert refused.json()["limit"]["limit"] == 90_000


def test_a_provider_429_one_tenant_reports_slows_the_pool_on_every_partition(
    three_partitions: Engine, world: Any, neighbour: Neighbour
) -> None:
    """The pool's provider account is shared across partitions: a 429 released by the
    world's tenant empties the neighbour's part of the pool too, and lowers its share."""
    world.pool.backpressure = {"adaptive": True}
    world.pool.save()
    world.limit(pool=world.pool, metric="tokens", amount=90_000)
    three_partitions.frozen_ms = three_partitions.now_ms()  # no refill meanwhile
    rid = _reserve(world.client(), world.model.name, 1_000)["id"]
    released = world.client().post(
        f"/api/v1/reservations/{rid}/release", {"upstream_status": 429}, format="json"
    )
    assert released.status_code == 200, released.content
    theirs = three_partitions.tenant_space(neighbour.tenant.id)
    assert float(three_partitions.client.hget(theirs.pressure(world.pool.pk), "s")) < 1
    refused = neighbour.client().post(
        "/api/v1/reservations",
        {"feature": "chat", "model": world.model.name, "input_tokens": 500,
         "max_output_tokens": 500},
        format="json",
    )  # fmt: skip
    assert refused.status_code == 429, refused.content
    assert refused.json()["error"] == "rate_limited"
