from collections.abc import Iterator

import pytest

from tests.partitions import lone_tenant_allotments

__all__ = ["lone_tenant_allotments"]


@pytest.fixture(autouse=True)
def _steady_allotments(lone_tenant_allotments: None) -> Iterator[None]:
    """On a partitioned store, alerts are judged on the rebalancer's steady state for one
    tenant (tests/partitions.py); nothing on one partition."""
    yield
