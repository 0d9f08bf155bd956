"""The partition a test's tenant is on: its usage stream and its keys (QUOTA_PARTITIONS may
split the store; a tenant's events and leases are on `tenant id mod partitions`); and a
store of three partitions, whatever the settings say."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from ledger.services import LedgerStream, usage_stream
from quotas.engine import Engine
from quotas.engine.core import KeySpace
from quotas.keys import api_key_create
from quotas.models import Limit
from quotas.plan import plans
from quotas.reservations import get_engine
from tenants.models import Tenant
from tests.factories import FeatureFactory, TenantFactory
from tests.fixtures import World


def space_of(world: World) -> KeySpace:
    """The partition of the world's tenant."""
    return get_engine().tenant_space(world.tenant.id)


def stream_of(world: World) -> LedgerStream:
    """The usage stream of the world's tenant's partition, as the ledger reads it."""
    return usage_stream(space_of(world).index)


@pytest.fixture
def three_partitions(monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    """The process's engine on a store of three partitions (as QUOTA_PARTITIONS=3 makes it),
    for the test only."""
    engine = get_engine()
    if len(engine.spaces) != 3:
        spaces = Engine(engine.client, hash_tag=settings.QUOTA_HASH_TAG, partitions=3).spaces
        monkeypatch.setattr(engine, "spaces", spaces)
        monkeypatch.setattr(engine, "keys", spaces[0])
    usage_stream.cache_clear()  # the streams as the partitions name them
    yield engine
    usage_stream.cache_clear()


def shared_limit(**fields: Any) -> Limit:
    """A limit every tenant shares (no tenant, no feature), its allotments left as a store
    holds them before the rebalancer moved anything: split evenly over the partitions
    (`World.limit` may gather them on the world's tenant's partition)."""
    fields.setdefault("window", "minute")
    limit = Limit(**fields)
    limit.amount = Decimal(str(fields["amount"]))
    assert limit.tenant_id is None and limit.feature_id is None
    limit.full_clean()
    limit.save()
    plans.clear()
    return limit


def tenant_elsewhere(world: World, slug: str) -> tuple[Tenant, APIClient]:
    """A tenant (with a `chat` feature) on another partition than the world's, and a client
    of its key."""
    engine = get_engine()
    here = space_of(world).index
    while True:
        tenant = TenantFactory(slug=slug)
        if engine.tenant_space(tenant.id).index != here:
            break
        tenant.delete()
    FeatureFactory(tenant=tenant, slug="chat", priority="interactive")
    issued = api_key_create(tenant=tenant, name="test")
    plans.clear()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {issued.secret}")
    return tenant, client
