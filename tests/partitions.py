"""Tests on a partitioned quota store (QUOTA_PARTITIONS > 1, or a Redis Cluster).

A limit that tenants share is split there into allotments, one per partition, that the
rebalancer moves toward the partitions that ask (quotas/allotments.py): a tenant alone on a
pool gets all of it once the rebalancer has seen it ask. The tests of what one tenant sees
(the API, the limits' semantics, alerts, pages) start from that steady state with
`lone_tenant_allotments`: the first partition to reserve against a shared limit holds all
of it, the others none. What the split itself does is tested with the engine
(tests/quotas/engine) and in tests/quotas/test_usage.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from django.conf import settings

from quotas.allotments import split_checks
from quotas.engine import Engine, ReserveCall
from quotas.engine.core import KeySpace
from quotas.engine.types import Check
from quotas.plan import plans
from quotas.store import get_engine

PARTITIONED = settings.QUOTA_PARTITIONS > 1


def allot_whole(engine: Engine, space: KeySpace, check: Check) -> None:
    """Give a shared limit's whole amount to one partition and none to the others (as the
    rebalancer does for a partition alone in asking), unless a partition got it already.
    The format is allot.lua's: "units:amount" under the limit's id."""
    amount = (check.rate or check.cap) if check.kind == "b" else check.cap
    claim = f"{engine.keys.prefix}test_allot:{check.limit_id}"
    if not engine.client.set(claim, space.index, nx=True):
        return
    for other in engine.spaces:
        units = amount if other is space else 0
        engine.client.hset(other.allot, str(check.limit_id), f"{units}:{amount}")


def allot_shared(tenant_id: int) -> None:
    """Allot every shared limit of the plan whole to a tenant's partition now, before it
    reserves (nothing on one partition)."""
    engine = get_engine()
    if engine.partitioned:
        space = engine.tenant_space(tenant_id)
        for check in split_checks(plans.get(), space, engine.now_ms_estimate()):
            allot_whole(engine, space, check)


@pytest.fixture
def lone_tenant_allotments(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """On a partitioned store, every shared limit a reservation meets first is allotted
    whole to that reservation's partition (see the module's docstring); nothing on one."""
    if not get_engine().partitioned:
        yield
        return
    reserve = Engine.reserve
    seen: set[int] = set()  # asked once per test: a decision stays one Redis call after
    allotting = threading.Lock()  # a thread's reserve waits until another's allotment is in

    def allotted_reserve(self: Engine, call: ReserveCall) -> object:
        space = self.tenant_space(call.tenant_id)
        with allotting:
            for option in call.options:
                for check in option.checks:
                    if check.split and check.limit_id not in seen:
                        seen.add(check.limit_id)
                        allot_whole(self, space, check)
        return reserve(self, call)

    monkeypatch.setattr(Engine, "reserve", allotted_reserve)
    yield
