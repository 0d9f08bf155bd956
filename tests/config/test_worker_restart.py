"""A real Celery worker outlives restarts of its Redis broker.

The broker is a redis-server of the test's own on a loopback port (7150-7159), killed with
SIGKILL and started again on the same port a few times; the worker is a separate process
started the way bin/run starts it (prefork pool, heartbeat, gossip and mingle on). After each
restart the worker must still be running and must answer a task sent through the restarted
broker, its result stored there too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from tests.fakes.redis_server import RedisServer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is missing"),
]

ROOT = Path(__file__).resolve().parents[2]
PORTS = range(7150, 7160)
RESTARTS = 3


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    started = RedisServer(tmp_path, PORTS)
    started.start()
    yield started
    started.kill()


@pytest.fixture
def worker(broker: RedisServer, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "CELERY_BROKER_URL": broker.url,
        "CELERY_RESULT_BACKEND": broker.url,
        "CELERY_TASK_ALWAYS_EAGER": "false",
    }
    command = [sys.executable, "-m", "celery", "-A", "config", "worker", "--concurrency=1"]
    command += ["--loglevel=INFO", "-n", f"restart-{uuid.uuid4().hex[:8]}@%h"]
    log = (tmp_path / "worker.log").open("wb")
    process = subprocess.Popen(
        command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT
    )
    yield process
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log.close()


def _round_trip(sender: Celery, worker: subprocess.Popen[bytes], log: Path) -> None:
    """Send a task through the broker and wait for the worker's answer, resending while the
    broker is still coming back (a send into a dead connection may be lost)."""
    token = uuid.uuid4().hex
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert worker.poll() is None, f"the worker exited:\n{log.read_text()[-3000:]}"
        try:
            result = sender.send_task("celery.accumulate", args=(token,))
            assert result.get(timeout=5) == [token]
            return
        except Exception:  # broker unreachable or the answer not back yet: try again
            time.sleep(0.5)
    raise AssertionError(f"the worker ran no task within 60 s:\n{log.read_text()[-3000:]}")


def test_the_worker_survives_broker_restarts_and_keeps_running_tasks(
    broker: RedisServer, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    sender = Celery(broker=broker.url, backend=broker.url)
    try:
        _round_trip(sender, worker, log)
        for _ in range(RESTARTS):
            broker.kill()
            time.sleep(1.0)  # the worker notices the lost connection while Redis is down
            broker.start()
            _round_trip(sender, worker, log)
        assert worker.poll() is None
    finally:
        sender.close()
