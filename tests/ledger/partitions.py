"""The partition a test's tenant is on: its usage stream and its keys (QUOTA_PARTITIONS may
split the store; a tenant's events and leases are on `tenant id mod partitions`)."""

from __future__ import annotations

from ledger.services import LedgerStream, usage_stream
from quotas.engine.core import KeySpace
from quotas.reservations import get_engine
from tests.fixtures import World


def space_of(world: World) -> KeySpace:
    """The partition of the world's tenant."""
    return get_engine().tenant_space(world.tenant.id)


def stream_of(world: World) -> LedgerStream:
    """The usage stream of the world's tenant's partition, as the ledger reads it."""
    return usage_stream(space_of(world).index)
