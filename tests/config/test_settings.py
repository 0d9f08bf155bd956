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
