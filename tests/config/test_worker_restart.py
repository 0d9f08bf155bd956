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
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is missing"),
]

ROOT = Path(__file__).resolve().parents[2]
PORTS = range(7150, 7160)
RESTARTS = 3


def _free_port() -> int:
    for port in PORTS:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError("no free port in 7150-7159 for the test's own Redis")


class Broker:
    """A redis-server on one port that can be killed and started again."""

    def __init__(self, port: int, directory: Path) -> None:
        self.port = port
        self.directory = directory
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.05)
            finally:
                client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    started = Broker(_free_port(), tmp_path)
    started.start()
    yield started
    started.kill()


@pytest.fixture
def worker(broker: Broker, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
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
    broker: Broker, worker: subprocess.Popen[bytes], tmp_path: Path
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
