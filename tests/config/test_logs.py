"""Log lines: a request id taken from X-Request-ID or made and returned, one access line per
API call with tenant, feature, outcome and latency, refusals at INFO, and a JSON format."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

import pytest

from config.logs import RequestIdFilter
from tests.fixtures import World

ACCESS = "quotas.access"


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Records as the configured handler sees them: with the request id filter's field."""
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.INFO)
    return caplog


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ACCESS]


def test_a_callers_request_id_is_kept_and_returned(world: World, reserve: Any, logged: Any) -> None:
    client = world.client()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {world.secret}", HTTP_X_REQUEST_ID="req-42")
    response = reserve(client)
    assert response["X-Request-ID"] == "req-42"
    [line] = access_lines(logged)
    assert line.request_id == "req-42"


@pytest.mark.parametrize("given", [None, "", "x" * 129, "two words", "new\nline"])
def test_a_missing_or_unfit_request_id_is_replaced_by_a_new_one(
    world: World, reserve: Any, given: str | None
) -> None:
    client = world.client()
    if given is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {world.secret}", HTTP_X_REQUEST_ID=given)
    first, second = reserve(client)["X-Request-ID"], reserve(client)["X-Request-ID"]
    assert len(first) == 32 and first != second and first != given


def test_an_api_call_logs_one_access_line_with_tenant_feature_outcome_and_latency(
    world: World, reserve: Any, logged: Any
) -> None:
    held = reserve().json()["id"]
    world.client().post(
        f"/api/v1/reservations/{held}/commit", {"input_tokens": 1, "output_tokens": 1}, "json"
    )
    reserved, committed = access_lines(logged)
    assert (reserved.levelno, reserved.status, reserved.outcome) == (logging.INFO, 201, "reserved")
    assert (reserved.tenant, reserved.feature, reserved.method) == ("acme", "chat", "POST")
    assert reserved.latency_ms > 0
    assert reserved.getMessage().startswith("POST /api/v1/reservations 201 reserved tenant=acme")
    # a settling call names its reservation in its path; its answer does not name the feature
    assert (committed.outcome, committed.tenant) == ("committed", "acme")


def test_a_quota_refusal_is_logged_at_info_with_its_reason_and_django_adds_no_warning(
    world: World, reserve: Any, logged: Any
) -> None:
    world.limit(feature=world.chat, metric="requests", amount=1)
    assert reserve().status_code == 201
    assert reserve().status_code == 429

    refused = access_lines(logged)[-1]
    assert (refused.levelno, refused.status, refused.outcome) == (logging.INFO, 429, "rate_limited")
    assert refused.feature == "chat"
    assert not [r for r in logged.records if r.levelno >= logging.WARNING]


def test_errors_before_any_view_are_logged_with_their_code(
    db: Any, client: Any, logged: Any
) -> None:
    assert (
        client.post("/api/v1/reservations", {}, content_type="application/json").status_code == 401
    )
    assert client.get("/api/v1/nowhere").status_code == 404
    unauthenticated, unknown = access_lines(logged)
    assert (unauthenticated.outcome, unauthenticated.tenant) == ("unauthenticated", "-")
    assert (unknown.status, unknown.outcome) == (404, "not_found")


def test_a_caller_supplied_feature_is_shown_on_one_line(
    world: World, reserve: Any, logged: Any
) -> None:
    assert reserve(feature="evil\nINFO forged line").status_code in (400, 404)
    [line] = access_lines(logged)
    assert "\n" not in line.getMessage()


SHOW_LOG = """
import logging, django
django.setup()
from config.logs import REQUEST_ID
REQUEST_ID.set("abc123")
logging.getLogger("quotas.access").info("hello %s", "there", extra={"tenant": "acme"})
"""


def _log_line(**env: str) -> str:
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", **env}
    done = subprocess.run(
        [sys.executable, "-c", SHOW_LOG],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stderr.strip().splitlines()[-1]


def test_text_lines_carry_time_level_logger_and_request_id() -> None:
    line = _log_line(LOG_FORMAT="text")
    stamp, level, logger, request_id, message = line.split(" ", 4)
    assert stamp.endswith("Z") and "T" in stamp
    assert (level, logger, request_id, message) == ("INFO", ACCESS, "[abc123]", "hello there")


def test_log_format_json_writes_one_object_a_line() -> None:
    line = json.loads(_log_line(LOG_FORMAT="json"))
    assert line["level"] == "INFO" and line["logger"] == ACCESS
    assert (line["request_id"], line["message"], line["tenant"]) == (
        "abc123",
        "hello there",
        "acme",
    )
    assert line["timestamp"].startswith("20")


def test_an_unknown_log_format_is_refused_at_start() -> None:
    with pytest.raises(subprocess.CalledProcessError) as refused:
        _log_line(LOG_FORMAT="xml")
    assert "LOG_FORMAT must be text or json" in refused.value.stderr
