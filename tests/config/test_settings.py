"""Settings read from the environment, checked in a fresh interpreter (settings load once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SHOW_OPTIONS = (
    "import json, django; from django.conf import settings; django.setup(); "
    "print(json.dumps(settings.DATABASES['default'].get('OPTIONS', {})))"
)


def _database_options(**env: str) -> dict[str, object]:
    environment = {k: v for k, v in os.environ.items() if k != "DATABASE_CONNECT_TIMEOUT"}
    environment.update(DJANGO_SETTINGS_MODULE="config.settings", **env)
    shown = subprocess.run(
        [sys.executable, "-c", SHOW_OPTIONS],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    options: dict[str, object] = json.loads(shown.stdout.strip().splitlines()[-1])
    return options


POSTGRES = "postgres://quota@db.invalid:5432/quota"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DATABASE_URL": POSTGRES}, 5),
        ({"DATABASE_URL": POSTGRES, "DATABASE_CONNECT_TIMEOUT": "2"}, 2),
        ({"DATABASE_URL": POSTGRES + "?connect_timeout=9"}, 9),
    ],
)
def test_a_postgresql_connection_attempt_is_bounded(env: dict[str, str], expected: int) -> None:
    assert int(str(_database_options(**env)["connect_timeout"])) == expected


def test_sqlite_gets_no_connect_timeout() -> None:
    assert "connect_timeout" not in _database_options(DATABASE_URL="sqlite:///:memory:")


WRITER = """
import sys, time, django
django.setup()
from django.db import connection, transaction

for n in range(int(sys.argv[1])):
    # the rollups' pattern: read inside the transaction, work on it, then write
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT COALESCE(MAX(n), 0) FROM counter")
        (top,) = cursor.fetchone()
        time.sleep(0.002)
        cursor.execute("INSERT INTO counter (n, writer) VALUES (%s, %s)", [top + 1, sys.argv[2]])
"""


@pytest.mark.slow
def test_sqlite_takes_concurrent_writers_that_read_first(tmp_path: object) -> None:
    """Processes that each read and then write in one transaction, at once, on the default
    SQLite settings. With a deferred BEGIN a writer that read first fails at once with
    "database is locked" (SQLite will not wait on a lock upgrade): run with Django's own
    SQLite defaults, or with WAL alone, three of the four writers fail. With BEGIN IMMEDIATE
    each waits its turn, and no read-then-write loses an update."""
    import sqlite3
    from pathlib import Path

    path = Path(str(tmp_path)) / "concurrent.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE counter (n INTEGER UNIQUE, writer TEXT)")
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings"}
    environment["DATABASE_URL"] = f"sqlite:///{path}"
    writers, rounds = 4, 100
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(rounds), f"w{i}"],
            env=environment,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(writers)
    ]
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0] * writers, errors
    with sqlite3.connect(path) as db:
        count, top = db.execute("SELECT COUNT(*), MAX(n) FROM counter").fetchone()
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert count == top == writers * rounds
