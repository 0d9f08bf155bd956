"""Redis loses its data mid-traffic, with real processes: a redis-server of the test's own
without persistence, gunicorn serving the API with two worker processes, and a Celery worker
with beat (ingest, lease reaper, and the rebuild the first decision after the loss starts).

A hard daily budget of 1,000,000 tokens is spent, a quarter of the grants left held; the
ledger catches up; Redis is SIGKILLed and restarted empty while requests keep coming; the held
reservations are committed afterwards. The ledger must show the budget never admitted more
than its amount, every acknowledged commit exactly once, and one rebuild.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from django.db import connection

from quotas.models import ConfigVersion, Limit
from tests.fixtures import World
from tests.ledger.test_worker import _postgres_url, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BUDGET = 1_000_000
IN, OUT, USED_OUT = 4000, 4000, 1000  # 8,000 tokens reserved, 5,000 used
VERSION_KEY = "q:{quota}:config_version"


def _free_port(ports: range) -> int:
    for port in ports:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports}")


class Redis:
    """A redis-server without persistence: SIGKILL and a restart lose everything."""

    def __init__(self, logs: Path) -> None:
        self.port = _free_port(range(7130, 7150))
        self.logs = logs
        self.process: subprocess.Popen[bytes] | None = None
        self.client = redis.Redis(port=self.port)

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no"]
        log = (self.logs / "redis.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._answers, seconds=10, what="redis-server to answer")

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class Ledger:
    """The ledger the processes write, read from the test: the PostgreSQL test database, or a
    file copy of SQLite's in-memory one."""

    def __init__(self, tmp: Path) -> None:
        self.path: Path | None = None
        if connection.vendor == "sqlite":
            self.path = tmp / "shared.sqlite3"
            connection.ensure_connection()
            with sqlite3.connect(self.path) as copy:
                connection.connection.backup(copy)
            self.url = f"sqlite:///{self.path}"
        else:
            self.url = _postgres_url()

    def rows(self) -> dict[str, dict[str, Any]]:
        query = (
            "SELECT rid, state, degraded, input_tokens, output_tokens, reserved_input_tokens, "
            "reserved_output_tokens FROM ledger_usageevent"
        )
        if self.path is not None:
            with sqlite3.connect(self.path, timeout=10) as db:
                cursor = db.execute(query)
                names = [c[0] for c in cursor.description]
                return {r[0]: dict(zip(names, r, strict=True)) for r in cursor.fetchall()}
        with connection.cursor() as cursor:
            cursor.execute(query)
            names = [c[0] for c in cursor.description]
            return {r[0]: dict(zip(names, r, strict=True)) for r in cursor.fetchall()}


@contextmanager
def processes(env: dict[str, str], logs: Path) -> Iterator[int]:
    """gunicorn (two workers) and a Celery worker with beat; yields the web port."""
    port = _free_port(range(7130, 7150))
    web = [str(BIN / "gunicorn"), "config.wsgi:application", "--workers=2"]
    web += [f"--bind=127.0.0.1:{port}", "--timeout=60"]
    if (
        "--no-control-socket"
        in subprocess.run([str(BIN / "gunicorn"), "--help"], capture_output=True, text=True).stdout
    ):
        web.append("--no-control-socket")
    worker = [sys.executable, "-m", "celery", "-A", "config", "worker", "--pool=solo", "-B"]
    worker += ["-s", str(logs / "beat-schedule"), "--without-heartbeat", "--without-gossip"]
    worker += ["--without-mingle", "--loglevel=WARNING"]
    started = []
    try:
        for name, command in (("web", web), ("worker", worker)):
            log = (logs / f"{name}.log").open("wb")
            started.append(
                subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        wait_until(
            lambda: _status(port, "GET", "/api/schema/", None) == 200,
            seconds=30,
            what="gunicorn to answer",
        )
        yield port
    finally:
        for process in started:
            os.killpg(process.pid, signal.SIGTERM)
        for process in started:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _status(port: int, method: str, path: str, key: str | None) -> int:
    return _call(port, method, path, key, None)[0]


def _call(
    port: int, method: str, path: str, key: str | None, body: dict[str, Any] | None
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}
        | ({"Authorization": f"Bearer {key}"} if key else {}),
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, _json(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, _json(error.read())
    except (ConnectionError, urllib.error.URLError):
        return 0, {}


def _json(body: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(body)
    except ValueError:  # the schema's YAML
        return {}
    return answer if isinstance(answer, dict) else {}


class Traffic:
    """What clients were told: grants, and commits acknowledged with their usage."""

    def __init__(self, port: int, key: str, model: str) -> None:
        self.port, self.key, self.model = port, key, model
        self.lock = threading.Lock()
        self.held: list[str] = []
        self.committed: dict[str, int] = {}
        self.statuses: dict[int, int] = {}
        self.counter = itertools.count()

    def reserve(self) -> str | None:
        body = {"feature": "chat", "model": self.model, "input_tokens": IN}
        body |= {"max_output_tokens": OUT, "ttl_seconds": 3600}
        status, answer = _call(self.port, "POST", "/api/v1/reservations", self.key, body)
        with self.lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1
        return answer["id"] if status == 201 else None

    def commit(self, rid: str, *, retry_until: float) -> int:
        """Commit until acknowledged (a 503 or a refused connection is retried)."""
        body = {"input_tokens": IN, "output_tokens": USED_OUT}
        while True:
            status, _ = _call(
                self.port, "POST", f"/api/v1/reservations/{rid}/commit", self.key, body
            )
            if status not in (0, 503) or time.monotonic() > retry_until:
                break
            time.sleep(0.1)
        if status == 200:
            with self.lock:
                self.committed[rid] = IN + USED_OUT
        return status

    def spend(self, stop: Callable[[], bool]) -> None:
        """Reserve; leave every fourth grant held, commit the others."""
        while not stop():
            rid = self.reserve()
            if rid is None:
                time.sleep(0.01)
                continue
            if next(self.counter) % 4 == 0:
                with self.lock:
                    self.held.append(rid)
            else:
                assert self.commit(rid, retry_until=time.monotonic() + 20) == 200


def _threads(target: Callable[[], None], count: int) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_a_redis_that_lost_its_data_never_readmits_a_spent_budget(
    world: World, tmp_path: Path
) -> None:
    Limit.objects.create(tenant=world.tenant, metric="tokens", window="day", amount=BUDGET)
    assert ConfigVersion.read() > 0
    ledger = Ledger(tmp_path)
    store = Redis(tmp_path)
    store.start()
    store.client.set(VERSION_KEY, 1)  # a deployed store
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": ledger.url,
        "REDIS_URL": store.url,
        "CELERY_BROKER_URL": store.url,
        "CELERY_RESULT_BACKEND": store.url,
        "CELERY_TASK_ALWAYS_EAGER": "false",
        "LEDGER_INGEST_SECONDS": "0.3",
        "LEDGER_RESTORED_LEASE_SECONDS": "3600",
    }
    try:
        with processes(env, tmp_path) as port:
            traffic = Traffic(port, world.secret, world.model.name)
            exhausted = lambda: traffic.statuses.get(429, 0) >= 20  # noqa: E731
            for thread in _threads(lambda: traffic.spend(exhausted), 4):
                thread.join(timeout=40)
            before = dict(traffic.committed), list(traffic.held)
            wait_until(
                lambda: all(r in ledger.rows() for r in [*before[0], *before[1]]),
                seconds=20,
                what="the ledger to hold every grant made before the loss",
            )

            # requests keep coming while Redis dies and comes back empty
            done = threading.Event()
            pounding = _threads(lambda: traffic.spend(done.is_set), 2)
            time.sleep(0.3)
            store.kill()
            time.sleep(0.3)
            store.start()
            deadline = time.monotonic() + 20
            held_answers = [traffic.commit(rid, retry_until=deadline) for rid in before[1]]
            refusals = traffic.statuses.get(429, 0)
            wait_until(
                lambda: traffic.statuses.get(429, 0) >= refusals + 10,
                seconds=20,
                what="what the commits refunded to be spent again",
            )
            done.set()
            for thread in pounding:
                thread.join(timeout=20)

            wait_until(
                lambda: all(
                    ledger.rows().get(r, {}).get("state") == "committed" for r in traffic.committed
                ),
                seconds=20,
                what="the ledger to hold every acknowledged commit",
            )
            rows = ledger.rows()
            time.sleep(1.5)  # a second ingest finds nothing more to add
            assert ledger.rows() == rows
    finally:
        if store.process and store.process.poll() is None:
            store.process.terminate()
            store.process.wait(timeout=10)

    assert held_answers == [200] * len(before[1])  # pre-loss reservations were accepted
    assert len(before[1]) >= 20 and traffic.statuses.get(503, 0) > 0

    def admitted(row: dict[str, Any]) -> int:
        if row["state"] == "committed":
            return int(row["input_tokens"] + row["output_tokens"])
        if row["state"] in ("held", "expired"):
            return int(row["reserved_input_tokens"] + row["reserved_output_tokens"])
        return 0

    total = sum(admitted(row) for row in rows.values() if not row["degraded"])
    assert BUDGET - IN - OUT < total <= BUDGET
    assert {rid for rid, row in rows.items() if row["state"] == "committed"} == set(
        traffic.committed
    )
    assert all(
        admitted(rows[rid]) == tokens for rid, tokens in traffic.committed.items()
    )  # exactly once: one row each, with the usage acknowledged

    web_log = (tmp_path / "web.log").read_text()
    worker_log = (tmp_path / "worker.log").read_text()
    assert web_log.count("the quota store lost its data") == 1, web_log[-3000:]
    assert worker_log.count("quota store rebuilt from the ledger") == 1, worker_log[-3000:]
