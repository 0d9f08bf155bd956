"""Fixtures shared by the server's tests and the SDK's: each conftest.py imports them."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Any, cast

import pytest
import redis
import redis.cluster
from django.conf import settings
from rest_framework.test import APIClient

import quotas.degraded
from providers.models import LanguageModel, Pool
from quotas.keys import api_key_create
from quotas.models import Limit
from quotas.plan import plans
from quotas.reservations import get_engine
from quotas.store import cluster_client, get_redis
from tenants.models import Feature, Tenant
from tests.factories import (
    FeatureFactory,
    LanguageModelFactory,
    PoolFactory,
    TenantFactory,
)

# A Redis that refuses connections, for the tests of the fail modes.
DEAD_STORE = "redis://127.0.0.1:1/0"


def _flush(client: redis.Redis | redis.cluster.RedisCluster) -> None:
    """Empty the quota store: the test's Redis database, or every master of the test's own
    cluster (QUOTA_REDIS_CLUSTER_NODES, set by `python -m tests.fakes.redis_cluster`) together
    with the database at REDIS_URL, which Django's cache and Celery keep using."""
    if isinstance(client, redis.cluster.RedisCluster):
        nodes = os.environ.get("QUOTA_REDIS_CLUSTER_NODES")
        assert nodes and nodes == os.environ.get("TEST_REDIS_CLUSTER_NODES"), (
            f"tests flush only a cluster of their own (tests.fakes.redis_cluster): {nodes}"
        )
        client.flushall(target_nodes=redis.cluster.RedisCluster.PRIMARIES)
        client = _shared_redis()
    index = client.connection_pool.connection_kwargs.get("db", 0)
    assert index != 0, f"tests must not use Redis database 0 ({settings.REDIS_URL})"
    client.flushdb()


@lru_cache(maxsize=1)
def _shared_redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


def _spool_emptied() -> None:
    """The degraded events a test left in this process's spool are dropped, and the thread
    draining it is gone, so that none is written into another test's store."""
    while True:
        quotas.degraded._spool.clear()
        drainer = quotas.degraded._drainer
        if drainer is None:
            return
        drainer.join(timeout=quotas.degraded.DRAIN_SECONDS * 3)


@pytest.fixture(autouse=True)
def redis_db() -> Iterator[redis.Redis]:
    client = get_redis()
    _spool_emptied()
    _flush(client)
    plans.clear()
    get_engine().clock_offset_ms, get_engine().frozen_ms = 0, None
    yield client
    _spool_emptied()
    _flush(client)
    plans.clear()
    get_engine().clock_offset_ms, get_engine().frozen_ms = 0, None


@dataclass
class World:
    """One tenant with a chat and a batch feature sharing one pool, and an API key."""

    tenant: Tenant
    chat: Feature
    batch: Feature
    model: LanguageModel
    pool: Pool
    secret: str

    def client(self, secret: str | None = None) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret or self.secret}")
        return client

    def limit(self, **fields: Any) -> Limit:
        fields.setdefault("window", "minute")
        limit = Limit(**fields)
        if "amount" in fields:
            limit.amount = Decimal(str(fields["amount"]))
        limit.full_clean()
        limit.save()
        plans.clear()
        return limit


def store_client() -> redis.Redis:
    """A new client of the store the tests run on: the cluster of the cluster pass, or
    REDIS_URL's Redis (for a test's own engine, or a forked process's)."""
    if settings.QUOTA_REDIS_CLUSTER_NODES:
        return cast(redis.Redis, cluster_client(settings.QUOTA_REDIS_CLUSTER_NODES))
    return redis.Redis.from_url(settings.REDIS_URL)


@pytest.fixture
def world(db: Any) -> World:
    tenant = TenantFactory(slug="acme", timezone="Europe/Berlin")
    model = LanguageModelFactory()
    pool = PoolFactory(slug="shared", served_models=[model])
    chat = FeatureFactory(tenant=tenant, slug="chat", priority="interactive")
    batch = FeatureFactory(tenant=tenant, slug="batch", priority="batch")
    issued = api_key_create(tenant=tenant, name="test")
    plans.clear()
    return World(tenant, chat, batch, model, pool, issued.secret)


@pytest.fixture
def reserve(world: World) -> Callable[..., Any]:
    """POST a reservation with sensible defaults; returns the response."""

    def call(client: APIClient | None = None, **body: Any) -> Any:
        body.setdefault("feature", "chat")
        body.setdefault("model", world.model.name)
        if not {"input_tokens", "messages", "prompt"} & set(body):
            body["input_tokens"] = 100
        body.setdefault("max_output_tokens", 100)
        return (client or world.client()).post("/api/v1/reservations", body, format="json")

    return call
