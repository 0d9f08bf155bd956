"""Crashes under traffic, with real processes (gunicorn with two workers, a Celery worker with
beat, a redis-server of the test's own): a Redis that keeps an AOF is SIGKILLed while
reservations and commits flow and restarts from it; a Celery worker is SIGKILLed holding a
batch it read and never acknowledged, and a new one takes over."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from quotas.models import Limit
from tests.fixtures import World
from tests.ledger.stack import (
    IN,
    OUT,
    VERSION_KEY,
    Deployment,
    RedisServer,
    admitted,
    deployment,
    threads,
    wait_until,
)

# a Redis of their own, killed and restarted: the cluster's own failover is test_cluster_failover
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.single_redis]

BUDGET = 3_000_000
# What a SIGKILLed Redis with `appendfsync everysec` may lose: commands it answered but had not
# yet written to the AOF. It writes before answering, except while the previous second's fsync
# is still running: then it holds the writes back, at most two seconds (Redis's own limit),
# before writing anyway. The kernel keeps whatever was written, since only the process died.
FSYNC_MARGIN = 2.0


def test_a_redis_with_an_aof_killed_mid_traffic_keeps_its_budget_and_acknowledged_commits(
    world: World, tmp_path: Path
) -> None:
    """Redis runs with `--appendonly yes --appendfsync everysec` in the test's directory and is
    SIGKILLed once 25 commits were acknowledged more than FSYNC_MARGIN ago, before the budget
    is spent (asserted: nothing refused yet), then restarted from its AOF; traffic goes on until the
    budget is spent, the leases left held are committed, and what they refunded is spent again.

    Asserted, from the ledger:
    * the budget: committed usage + reserved tokens of held and expired leases, over every
      reservation of the day, is at most BUDGET and more than BUDGET less one reservation
      (spent to the last grant). No allowance: the pool fails closed, so no degraded grant
      bypasses the counters (asserted: none), and the AOF kept the store's config version, so
      no rebuild ran (asserted from the logs). An overrun could only come from counters the AOF
      lost while the ledger kept their events; a process kill lost none here.
    * commits: every commit acknowledged more than FSYNC_MARGIN (2 s) before the kill, and
      every one after it, is committed in the ledger once with the usage acknowledged; the only
      ones allowed to be missing were acknowledged within the margin. No committed row is
      unknown to the client. (A reservation id is unique in the ledger, so "once" means each
      commit's row carries its usage once, not twice.)
    """
    Limit.objects.create(tenant=world.tenant, metric="tokens", window="day", amount=BUDGET)
    store = RedisServer(tmp_path, persistent=True)
    with deployment(world, tmp_path, store) as deployed:
        traffic = deployed.traffic
        traffic.pause = 0.03  # at most ~100 grants/s of 8,000 tokens: 3 s leave budget unspent
        done = threading.Event()
        clients = threads(lambda: traffic.spend(done.is_set), 3)
        # some commits acknowledged well before the kill, whatever the machine's load
        wait_until(lambda: len(traffic.committed) >= 25, seconds=30, what="commits")
        time.sleep(FSYNC_MARGIN + 0.5)
        refused_before_kill = traffic.statuses.get(429, 0)
        killed_at = time.monotonic()
        store.kill()
        time.sleep(0.3)
        store.start()
        version_kept = store.client.exists(VERSION_KEY) == 1
        traffic.pause = 0
        wait_until(traffic.refused(20), seconds=30, what="the budget to be spent")
        done.set()
        for thread in clients:
            thread.join(timeout=30)
        left_held = list(traffic.held)
        held = [traffic.commit(rid, retry_until=time.monotonic() + 20) for rid in left_held]
        for thread in threads(lambda: traffic.spend(traffic.refused(10)), 2):
            thread.join(timeout=30)
        rows = deployed.settled_rows()
        web_log, worker_log = deployed.services.log("web"), deployed.services.log("worker")

    assert refused_before_kill == 0 and traffic.statuses.get(503, 0) > 0  # killed mid-traffic
    assert version_kept and held == [200] * len(left_held) and not traffic.failed
    assert not any(row["degraded"] for row in rows.values())
    assert BUDGET - IN - OUT < sum(admitted(row) for row in rows.values()) <= BUDGET

    committed = {rid for rid, row in rows.items() if row["state"] == "committed"}
    at_risk = {
        rid
        for rid, at in traffic.acknowledged_at.items()
        if killed_at - FSYNC_MARGIN <= at <= killed_at
    }
    safe = set(traffic.committed) - at_risk
    assert len([rid for rid in safe if traffic.acknowledged_at[rid] < killed_at]) >= 20
    assert safe <= committed <= set(traffic.committed), sorted(safe - committed)
    assert all(admitted(rows[rid]) == traffic.committed[rid] for rid in committed)
    assert "lost its data" not in web_log and "rebuilt" not in worker_log


def _kill_worker_mid_batch(deployed: Deployment, world: World) -> int:
    """SIGKILLs the worker as soon as it holds entries it read and has not acknowledged;
    returns how many it left pending (0 when it acknowledged them before the signal landed).
    The entries are the world's tenant's: on its partition's stream."""
    stream = deployed.streams[world.tenant.id % len(deployed.streams)]
    wait_until(lambda: stream.pending() > 0, seconds=20, what="the worker to read a batch")
    deployed.services.kill_worker()
    return stream.pending()


def test_a_worker_killed_mid_batch_under_traffic_loses_and_duplicates_nothing(
    world: World, tmp_path: Path
) -> None:
    """Reservations and commits flow through gunicorn while the Celery worker is SIGKILLed
    holding a batch it read and never acknowledged (its first: the traffic since it started,
    up to 1,000 entries, long enough to write that the signal lands before the
    acknowledgement); a new worker (reclaiming entries idle for a second) takes over. Once it
    has drained the stream the ledger holds exactly what the clients were told: every grant
    one row, every acknowledged commit committed with its usage, every lease left held still
    held."""
    store = RedisServer(tmp_path)
    with deployment(world, tmp_path, store, LEDGER_CLAIM_IDLE_MS="1000") as deployed:
        traffic = deployed.traffic
        done = threading.Event()
        clients = threads(lambda: traffic.spend(done.is_set), 3)
        wait_until(lambda: len(traffic.committed) >= 20, seconds=20, what="commits")
        left_pending = _kill_worker_mid_batch(deployed, world)
        deployed.services.start_worker()
        commits_at_kill = len(traffic.committed)
        wait_until(
            lambda: len(traffic.committed) >= commits_at_kill + 20, seconds=20, what="commits"
        )
        done.set()
        for thread in clients:
            thread.join(timeout=30)
        rows = deployed.settled_rows()

    assert left_pending > 0 and not traffic.failed
    assert set(rows) == traffic.granted()
    assert {rid for rid, row in rows.items() if row["state"] == "committed"} == set(
        traffic.committed
    )
    assert {rid for rid, row in rows.items() if row["state"] == "held"} == set(traffic.held)
    assert all(admitted(rows[rid]) == tokens for rid, tokens in traffic.committed.items())
