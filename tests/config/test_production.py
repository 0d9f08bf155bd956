"""Production by environment alone: with DEBUG=false the process will not start on a public
default secret, and `check --deploy` with the values docs/operations.md gives is silent."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.config.test_gunicorn import GUNICORN, _own_options
from tests.fakes.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = ROOT / "docs" / "operations.md"
OURS = ("DEBUG", "SECRET_KEY", "QUOTA_API_KEY_PEPPER", "LOG_FORMAT", "METRICS_TOKEN")


def environment(**env: str) -> dict[str, str]:
    """This process's environment less what the test decides, plus `env`."""
    kept = {k: v for k, v in os.environ.items() if k not in OURS and not k.startswith("SECURE_")}
    return {**kept, "DJANGO_SETTINGS_MODULE": "config.settings", **env}


def manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=environment(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "SECRET_KEY and QUOTA_API_KEY_PEPPER are"),
        ({"QUOTA_API_KEY_PEPPER": secrets.token_urlsafe(32)}, "SECRET_KEY is"),
    ],
)
def test_production_refuses_to_start_with_a_default_secret(env: dict[str, str], named: str) -> None:
    refused = manage("check", DEBUG="false", **env)
    assert refused.returncode != 0
    assert f"DEBUG=false declares production, and {named} still the public" in refused.stderr


def test_gunicorn_will_not_serve_in_production_with_the_default_secret(tmp_path: Path) -> None:
    port = free_port(range(7150, 7170))
    served = subprocess.run(
        [str(GUNICORN), "config.wsgi:application", f"--bind=127.0.0.1:{port}", *_own_options()],
        cwd=ROOT,
        env=environment(DEBUG="false"),
        capture_output=True,
        text=True,
        timeout=120,
    )  # it exits by itself: the worker cannot boot
    assert served.returncode != 0
    assert "DEBUG=false declares production" in served.stderr


def test_a_fresh_checkout_starts_with_the_development_defaults() -> None:
    started = manage("check")
    assert started.returncode == 0, started.stderr


def documented_production_environment() -> dict[str, str]:
    """The `NAME=value` lines of the production block in docs/operations.md; a `<...>`
    placeholder becomes a fresh random secret."""
    text = OPERATIONS.read_text()
    block = re.search(r"<!-- production environment -->\n```sh\n(.*?)```", text, re.S)
    assert block, "docs/operations.md has lost its production block"
    values = dict(line.split("=", 1) for line in block.group(1).splitlines() if "=" in line)
    return {
        name: secrets.token_urlsafe(50) if value.startswith("<") else value
        for name, value in values.items()
    }


def test_check_deploy_with_the_documented_production_values_is_silent() -> None:
    production = documented_production_environment()
    assert production["DEBUG"] == "false"

    checked = manage("check", "--deploy", "--fail-level", "WARNING", **production)

    assert checked.returncode == 0, checked.stdout + checked.stderr
    issues = [
        line
        for line in checked.stderr.splitlines() + checked.stdout.splitlines()
        if re.match(r"\?: \(|\w+: \(", line)
    ]
    assert issues == []
    assert "security." not in checked.stdout + checked.stderr
