"""The ledger with real Celery worker processes: the broker is the real Redis, the worker a
separate process, and the crash tests kill it between the database commit and the
acknowledgement (and before the commit) through the ingest service's fault hook.

The broker lives in the test's own Redis database (the one TEST_REDIS_URL names, flushed by
every test), on a queue named for the test, so no other test run can see its messages. The
worker reaches the test's database: PostgreSQL's test database as it is; SQLite's in-memory
test database is copied to a file for the worker and copied back to be checked.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from django.conf import settings
from django.db.models import Sum

from ledger.models import UsageEvent
from ledger.services import FAULT_ENV, usage_streams
from tests.fixtures import World
from tests.ledger.partitions import stream_of
from tests.ledger.stack import ROOT, Ledger, celery_worker, process_env, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

INGEST_TASK = "ledger.tasks.ledger_ingest"


@pytest.fixture
def worker_database(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path)


class Workers:
    """Starts worker processes on a queue of their own and sends them tasks."""

    def __init__(self, database: Ledger, logs: Path) -> None:
        self.database = database
        self.logs = logs
        self.queue = f"ledger-test-{uuid.uuid4().hex[:8]}"
        self.sender = Celery(broker=settings.REDIS_URL)
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, **env: str) -> subprocess.Popen[bytes]:
        # no fault point unless asked for, whatever the test's own environment says
        environment = process_env(self.database.url, settings.REDIS_URL, **{FAULT_ENV: ""} | env)
        log = (self.logs / f"worker-{len(self.processes)}.log").open("wb")
        name = f"{self.queue}-{len(self.processes)}@%h"
        process = subprocess.Popen(
            celery_worker("-Q", self.queue, "-n", name),
            cwd=ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        return process

    def ingest(self) -> None:
        self.sender.send_task(INGEST_TASK, queue=self.queue)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.sender.close()


@pytest.fixture
def workers(worker_database: Ledger, tmp_path: Path) -> Iterator[Workers]:
    started = Workers(worker_database, tmp_path)
    yield started
    started.stop()


def drained(world: World) -> bool:
    """Every partition's stream acknowledged, the world's tenant's not empty."""
    stream = stream_of(world)
    backlog = sum(other.backlog() for other in usage_streams())
    return backlog == 0 and stream.client.exists(stream.key) == 1


def traffic(world: World, reserve: Any, *, reservations: int, commits: int) -> list[str]:
    rids = [
        reserve(input_tokens=100, max_output_tokens=50).json()["id"] for _ in range(reservations)
    ]
    for n, rid in enumerate(rids[:commits]):
        body = {"input_tokens": 90, "output_tokens": 10 + n}
        assert (
            world.client()
            .post(f"/api/v1/reservations/{rid}/commit", body, format="json")
            .status_code
            == 200
        )
    return rids


def assert_exactly_once(rids: list[str], commits: int) -> None:
    rows = UsageEvent.objects.filter(rid__in=rids)
    assert rows.count() == len(rids) == UsageEvent.objects.count()
    assert rows.filter(state="committed").count() == commits
    assert rows.filter(state="held").count() == len(rids) - commits
    total = rows.aggregate(Sum("output_tokens"))["output_tokens__sum"]
    assert total == sum(10 + n for n in range(commits))


def test_reservations_committed_through_the_api_reach_the_ledger_once_via_a_worker(
    world: World, reserve: Any, workers: Workers
) -> None:
    rids = traffic(world, reserve, reservations=12, commits=8)
    workers.start()
    workers.ingest()
    workers.ingest()  # a second run finds nothing new

    wait_until(lambda: drained(world), seconds=30, what="the worker to drain the stream")
    rids += traffic(world, reserve, reservations=2, commits=0)
    workers.ingest()
    wait_until(lambda: drained(world), seconds=30, what="the worker to drain the stream")

    workers.database.sync()
    assert_exactly_once(rids, commits=8)


@pytest.mark.parametrize("point", ["before_commit", "after_commit"])
def test_a_worker_killed_mid_batch_loses_and_duplicates_nothing(
    world: World, reserve: Any, workers: Workers, point: str
) -> None:
    rids = traffic(world, reserve, reservations=6, commits=4)  # 10 entries
    doomed = workers.start(**{FAULT_ENV: point, "LEDGER_BATCH_SIZE": "4"})
    workers.ingest()
    assert doomed.wait(timeout=30) == 75

    stream = stream_of(world)
    # read by the dead worker, never acknowledged: its batch, and on PostgreSQL maybe the
    # next one, read while the first was being written
    assert stream.pending() in (4, 8)
    workers.database.sync()
    assert UsageEvent.objects.exists() is (point == "after_commit")

    workers.start(LEDGER_CLAIM_IDLE_MS="100", LEDGER_BATCH_SIZE="4")
    time.sleep(0.15)
    workers.ingest()
    wait_until(lambda: drained(world), seconds=30, what="a new worker to reclaim and drain")

    workers.database.sync()
    assert_exactly_once(rids, commits=4)
