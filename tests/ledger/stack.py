"""Real processes for the ledger's fault tests: a redis-server of the test's own, gunicorn
serving the API, Celery workers, the ledger as those processes write it, and clients that
keep a tally of what they were told."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection

from ledger.conf import ledger_setting
from ledger.models import UsageEvent
from quotas.engine.core import KeySpace
from quotas.engine.partitions import partition_tags
from quotas.engine.stream import UsageStream
from tests.config.test_gunicorn import GUNICORN, _own_options
from tests.fakes import redis_server
from tests.fakes.redis_server import free_port, wait_until
from tests.fixtures import World

ROOT = Path(__file__).resolve().parents[2]
IN, OUT, USED_OUT = 4000, 4000, 1000  # 8,000 tokens reserved, 5,000 used
# The processes' keys: the settings' partitions (QUOTA_PARTITIONS reaches them through the
# environment); the home partition's version is the plan's.
SPACES = tuple(
    KeySpace(tag, index, settings.QUOTA_PARTITIONS)
    for index, tag in enumerate(partition_tags(settings.QUOTA_HASH_TAG, settings.QUOTA_PARTITIONS))
)
VERSION_KEY = SPACES[0].version
EVENTS_KEY = SPACES[0].events


PORTS = range(7130, 7150)


class RedisServer(redis_server.RedisServer):
    """A redis-server of the fault tests' own, on their ports."""

    def __init__(self, logs: Path, *, persistent: bool = False) -> None:
        super().__init__(logs, PORTS, persistent=persistent)


def postgres_url() -> str:
    s = connection.settings_dict
    auth = s["USER"] + (f":{s['PASSWORD']}" if s["PASSWORD"] else "")
    return f"postgres://{auth}@{s['HOST'] or 'localhost'}:{s['PORT'] or 5432}/{s['NAME']}"


class Ledger:
    """The test's database as other processes reach it: PostgreSQL's test database as it is;
    SQLite's in-memory one copied to a file, and copied back by `sync`."""

    def __init__(self, tmp: Path) -> None:
        self.path: Path | None = None
        if connection.vendor != "sqlite":
            self.url = postgres_url()
            return
        self.path = tmp / "shared.sqlite3"
        connection.ensure_connection()
        with sqlite3.connect(self.path) as copy:
            connection.connection.backup(copy)
        self.url = f"sqlite:///{self.path}"

    def sync(self) -> None:
        """Make what the other processes wrote visible to this one."""
        if self.path is not None:
            with sqlite3.connect(self.path, timeout=10) as source:
                source.backup(connection.connection)

    def rows(self) -> dict[str, dict[str, Any]]:
        self.sync()
        fields = ("rid", "state", "degraded", "input_tokens", "output_tokens")
        fields += ("reserved_input_tokens", "reserved_output_tokens")
        return {row["rid"]: row for row in UsageEvent.objects.values(*fields)}


def admitted(row: dict[str, Any]) -> int:
    """Tokens a ledger row holds of a token budget: actual usage once committed, what was
    reserved while held or once expired, nothing once released."""
    if row["state"] == "committed":
        return int(row["input_tokens"] + row["output_tokens"])
    if row["state"] in ("held", "expired"):
        return int(row["reserved_input_tokens"] + row["reserved_output_tokens"])
    return 0


def process_env(database_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    """The environment of a server or worker process on that database and Redis."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": redis_url,
        "CELERY_RESULT_BACKEND": redis_url,
        "CELERY_TASK_ALWAYS_EAGER": "false",
        "LEDGER_INGEST_SECONDS": "0.3",
        **extra,
    }


def celery_worker(*options: str) -> list[str]:
    command = [sys.executable, "-m", "celery", "-A", "config", "worker", "--pool=solo"]
    return [*command, "--without-heartbeat", "--without-gossip", "--without-mingle", *options]


class Services:
    """gunicorn (two workers) and Celery workers with beat, each in a process group of its
    own; all of them are stopped on leaving the `with` block."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.started: list[subprocess.Popen[bytes]] = []
        self.worker: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Services:
        return self

    def _start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}-{len(self.started)}.log").open("wb")
        process = subprocess.Popen(
            command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.started.append(process)
        return process

    def web(self) -> int:
        """Starts gunicorn; returns its port once it answers."""
        port = free_port(PORTS)
        command = [str(GUNICORN), "config.wsgi:application", "--workers=2"]
        self._start("web", [*command, f"--bind=127.0.0.1:{port}", "--timeout=60", *_own_options()])
        wait_until(
            lambda: call(port, "GET", "/api/schema/", None, None)[0] == 200,
            seconds=30,
            what="gunicorn to answer",
        )
        return port

    def start_worker(self) -> None:
        """A Celery worker with beat (its schedule file its own: a killed beat may leave its
        file half written)."""
        schedule = self.logs / f"beat-schedule-{len(self.started)}"
        options = ["-B", "-s", str(schedule), "--loglevel=INFO"]
        self.worker = self._start("worker", celery_worker(*options))

    def kill_worker(self) -> None:
        assert self.worker is not None
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait()

    def log(self, name: str) -> str:
        return "".join(path.read_text() for path in sorted(self.logs.glob(f"{name}-*.log")))

    def __exit__(self, *exc: object) -> None:
        running = [process for process in self.started if process.poll() is None]
        for process in running:
            os.killpg(process.pid, signal.SIGTERM)
        for process in running:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def call(
    port: int, method: str, path: str, key: str | None, body: dict[str, Any] | None
) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of a request; status 0 when the connection failed."""
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
    """What clients were told: grants, commits acknowledged with their usage and when (by the
    monotonic clock), and commits that were never acknowledged."""

    def __init__(self, port: int, key: str, model: str, *, pause: float = 0.0) -> None:
        self.port, self.key, self.model = port, key, model
        self.pause = pause  # between one thread's reservations
        self.lock = threading.Lock()
        self.held: list[str] = []
        self.committed: dict[str, int] = {}
        self.acknowledged_at: dict[str, float] = {}
        self.failed: dict[str, int] = {}
        self.statuses: dict[int, int] = {}
        self.counter = itertools.count()

    def reserve(self) -> str | None:
        body = {"feature": "chat", "model": self.model, "input_tokens": IN}
        body |= {"max_output_tokens": OUT, "ttl_seconds": 3600}
        status, answer = call(self.port, "POST", "/api/v1/reservations", self.key, body)
        with self.lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1
        return answer["id"] if status == 201 else None

    def commit(self, rid: str, *, retry_until: float) -> int:
        """Commit until acknowledged (a 503 or a refused connection is retried)."""
        body = {"input_tokens": IN, "output_tokens": USED_OUT}
        while True:
            status, _ = call(
                self.port, "POST", f"/api/v1/reservations/{rid}/commit", self.key, body
            )
            if status not in (0, 503) or time.monotonic() > retry_until:
                break
            time.sleep(0.1)
        with self.lock:
            if status == 200:
                self.committed[rid] = IN + USED_OUT
                self.acknowledged_at[rid] = time.monotonic()
            else:
                self.failed[rid] = status
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
                self.commit(rid, retry_until=time.monotonic() + 20)
            time.sleep(self.pause)

    def refused(self, count: int) -> Callable[[], bool]:
        """A condition: `count` more reservations refused (429) than so far."""
        target = self.statuses.get(429, 0) + count
        return lambda: self.statuses.get(429, 0) >= target

    def granted(self) -> set[str]:
        with self.lock:
            return {*self.held, *self.committed}


def threads(target: Callable[[], None], count: int) -> list[threading.Thread]:
    started = [threading.Thread(target=target, daemon=True) for _ in range(count)]
    for thread in started:
        thread.start()
    return started


@dataclass
class Deployment:
    ledger: Ledger
    store: RedisServer
    services: Services
    traffic: Traffic

    @property
    def stream(self) -> UsageStream:
        """The home partition's stream."""
        return self.streams[0]

    @property
    def streams(self) -> list[UsageStream]:
        group = ledger_setting("LEDGER_GROUP")
        return [UsageStream(self.store.client, space.events, group) for space in SPACES]

    def drained(self) -> bool:
        """Every entry of the usage streams is in the ledger and acknowledged (and there are
        some)."""
        return all(stream.backlog() == 0 for stream in self.streams) and (
            self.store.client.exists(*(space.events for space in SPACES)) >= 1
        )

    def settled_rows(self) -> dict[str, dict[str, Any]]:
        """The ledger once the stream is drained; a later ingest finds nothing more to add."""
        wait_until(self.drained, seconds=20, what="the worker to drain the stream")
        rows = self.ledger.rows()
        time.sleep(1.5)
        assert self.drained() and self.ledger.rows() == rows
        return rows


@contextmanager
def deployment(world: World, tmp: Path, store: RedisServer, **env: str) -> Iterator[Deployment]:
    """`store` started as a deployed one (it has a config version), gunicorn and a Celery
    worker with beat on it and on the test's database, and a client of the world's tenant;
    everything is stopped on leaving."""
    ledger = Ledger(tmp)
    store.start()
    for space in SPACES:
        store.client.set(space.version, 1)
    try:
        with Services(process_env(ledger.url, store.url, **env), tmp) as services:
            port = services.web()
            services.start_worker()
            traffic = Traffic(port, world.secret, world.model.name)
            yield Deployment(ledger, store, services, traffic)
    finally:
        store.stop()
