"""Redis loses its data mid-traffic, with real processes: a redis-server of the test's own
without persistence, gunicorn serving the API with two worker processes, and a Celery worker
with beat (ingest, lease reaper, and the rebuild the first decision after the loss starts).

A hard daily budget of 1,000,000 tokens is spent, a quarter of the grants left held; the
ledger catches up; Redis is SIGKILLed and restarted empty while requests keep coming; the held
reservations are committed afterwards. The ledger must show the budget never admitted more
than its amount, every acknowledged commit exactly once, and one rebuild.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from quotas.models import ConfigVersion, Limit
from tests.fixtures import World
from tests.ledger.stack import IN, OUT, RedisServer, admitted, deployment, threads, wait_until

# a Redis of their own, killed and restarted: the cluster's own failover is test_cluster_failover
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.single_redis]

BUDGET = 1_000_000


def test_a_redis_that_lost_its_data_never_readmits_a_spent_budget(
    world: World, tmp_path: Path
) -> None:
    Limit.objects.create(tenant=world.tenant, metric="tokens", window="day", amount=BUDGET)
    assert ConfigVersion.read() > 0
    store = RedisServer(tmp_path)
    with deployment(world, tmp_path, store, LEDGER_RESTORED_LEASE_SECONDS="3600") as deployed:
        traffic, ledger = deployed.traffic, deployed.ledger
        for thread in threads(lambda: traffic.spend(traffic.refused(20)), 4):
            thread.join(timeout=40)
        before = dict(traffic.committed), list(traffic.held)
        wait_until(
            lambda: all(r in ledger.rows() for r in [*before[0], *before[1]]),
            seconds=20,
            what="the ledger to hold every grant made before the loss",
        )

        # requests keep coming while Redis dies and comes back empty
        done = threading.Event()
        pounding = threads(lambda: traffic.spend(done.is_set), 2)
        time.sleep(0.3)
        store.kill()
        time.sleep(0.3)
        store.start()
        deadline = time.monotonic() + 20
        held_answers = [traffic.commit(rid, retry_until=deadline) for rid in before[1]]
        wait_until(
            traffic.refused(10), seconds=20, what="what the commits refunded to be spent again"
        )
        done.set()
        for thread in pounding:
            thread.join(timeout=20)
        rows = deployed.settled_rows()
        web_log, worker_log = deployed.services.log("web"), deployed.services.log("worker")

    assert held_answers == [200] * len(before[1])  # pre-loss reservations were accepted
    assert len(before[1]) >= 20 and traffic.statuses.get(503, 0) > 0 and not traffic.failed
    total = sum(admitted(row) for row in rows.values() if not row["degraded"])
    assert BUDGET - IN - OUT < total <= BUDGET
    assert {rid for rid, row in rows.items() if row["state"] == "committed"} == set(
        traffic.committed
    )
    assert all(
        admitted(rows[rid]) == tokens for rid, tokens in traffic.committed.items()
    )  # exactly once: one row each, with the usage acknowledged
    assert web_log.count("the quota store lost its data") == 1, web_log[-3000:]
    assert worker_log.count("quota store rebuilt from the ledger") == 1, worker_log[-3000:]
