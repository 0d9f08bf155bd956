"""The hot routes answered in front of Django's handler (`quotas.api.wsgi.FastPath`, the
deployed WSGI application) answer every request exactly as Django's handler does: status,
headers in their order, and body, byte for byte; everything else reaches Django."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest
from django.core import signals
from django.core.handlers.wsgi import WSGIHandler
from django.http import Http404
from django.test import override_settings

from config.wsgi import application
from quotas.api.wsgi import FastPath
from quotas.reservations import get_engine
from tests.fakes.wsgi import (
    NOW_MS,
    RESERVATIONS,
    Answer,
    environ_for,
    reserve_body,
    same_start,
    served,
)
from tests.fixtures import World

pytestmark = pytest.mark.usefixtures("connections_kept", "clock_stopped")


@pytest.fixture
def clock_stopped() -> None:
    get_engine().frozen_ms = NOW_MS


def call(app: Any, path: str | bytes, body: Any = None, **kwargs: Any) -> Answer:
    return served(app, environ_for(path, body, **kwargs))


def session(world: World, app: Any) -> list[Answer]:
    """Every kind of answer the hot routes give, one request after another."""
    secret = world.secret
    model = world.model.name
    body = {"feature": "chat", "model": model, "input_tokens": 100, "max_output_tokens": 100}
    answers = []

    def post(path: str, payload: Any = None, **kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("secret", secret)
        answer = call(app, path, payload, **kwargs)
        answers.append(answer)
        try:
            parsed: dict[str, Any] = json.loads(answer[2])
        except ValueError:
            parsed = {}
        return parsed

    first = post(RESERVATIONS, {**body, "idempotency_key": "k1", "metadata": {"run": "café ☃"}})
    post(RESERVATIONS, {**body, "idempotency_key": "k1", "metadata": {"run": "café ☃"}})
    post(RESERVATIONS, {**body, "idempotency_key": "k1", "input_tokens": 5})  # 409
    done = f"{RESERVATIONS}/{first['id']}"
    post(done + "/commit", {"input_tokens": 90, "output_tokens": 40, "finish_reason": "stop"})
    post(done + "/commit", {"input_tokens": 90, "output_tokens": 40, "finish_reason": "stop"})
    post(done + "/extend", {"ttl_seconds": 30})  # 409: settled
    post(done + "/release")  # 409: settled
    held = f"{RESERVATIONS}/{post(RESERVATIONS, body)['id']}"
    post(held + "/extend", {"ttl_seconds": 120})
    post(held + "/release")
    post(
        f"{RESERVATIONS}/rsv_0123456789abcdef01234567/commit",
        {"input_tokens": 1, "output_tokens": 1},
    )  # 404
    post(RESERVATIONS, body, secret="qk_nothere_secret")  # 401
    post(RESERVATIONS, {**body, "input_tokens": -1, "ttl_seconds": 0})  # 400 with fields
    post(RESERVATIONS, raw=b'{"feature": "chat",')  # 400: not JSON
    post(RESERVATIONS, raw=b'{"max_output_tokens": NaN}')  # 400: NaN
    post(RESERVATIONS, {**body, "feature": "nope"})  # 404
    post(RESERVATIONS, {**body, "max_output_tokens": 850})  # 429: 870 of 1,000 left
    post(RESERVATIONS)  # no body: 400
    return answers


def test_the_deployed_application_serves_the_hot_routes_in_front_of_django() -> None:
    assert isinstance(application, FastPath)
    assert application.enabled, "MIDDLEWARE changed: review quotas/api/wsgi.py KNOWN_MIDDLEWARE"


def test_every_answer_of_the_hot_routes_is_django_s_byte_for_byte(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.limit(feature=world.chat, metric="tokens", window="minute", amount=1_000)
    runs = []
    for app in (application.django, application):
        same_start(monkeypatch)
        runs.append(session(world, app))

    django, fast = runs
    statuses = [status for status, _, _ in django]
    assert statuses == [
        "201 Created",
        "201 Created",
        "409 Conflict",
        "200 OK",
        "200 OK",
        "409 Conflict",
        "409 Conflict",
        "201 Created",
        "200 OK",
        "200 OK",
        "404 Not Found",
        "401 Unauthorized",
        "400 Bad Request",
        "400 Bad Request",
        "400 Bad Request",
        "404 Not Found",
        "429 Too Many Requests",
        "400 Bad Request",
    ]
    for number, (theirs, ours) in enumerate(zip(django, fast, strict=True)):
        assert ours == theirs, f"answer {number}"
    limited = dict(fast[16][1])
    assert limited["Retry-After"] and limited["RateLimit"] and limited["RateLimit-Policy"]


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"method": "GET", "path": RESERVATIONS + "/rsv_0123456789abcdef01234567"},
        {"method": "PUT", "path": RESERVATIONS},
        {"path": RESERVATIONS, "query": "format=json"},
        {"path": RESERVATIONS, "content_type": "text/plain", "raw": b"hello"},
        {"path": RESERVATIONS, "HTTP_ACCEPT": "text/html"},
        {"path": RESERVATIONS, "host": "evil.example"},
        {"path": "/api/v1/nowhere"},
        {"path": "/api/v1/features/chat/usage", "method": "GET"},
        {"path": RESERVATIONS, "HTTP_COOKIE": "csrftoken=not-a-token"},
    ],
    ids=["get", "put", "format", "text", "accept-html", "bad-host", "no-route", "usage", "cookie"],
)
def test_other_requests_are_answered_by_django(
    world: World, monkeypatch: pytest.MonkeyPatch, request_kwargs: dict[str, Any]
) -> None:
    kwargs = {"secret": world.secret, **request_kwargs}
    path = kwargs.pop("path")
    served = []
    django = application.django
    monkeypatch.setattr(
        application, "django", lambda e, s: served.append(e["PATH_INFO"]) or django(e, s)
    )

    ours = call(application, path, **kwargs)
    theirs = call(django, path, **kwargs)

    assert served == [path]
    # a new CSRF cookie differs from call to call, so headers are compared by name
    assert (ours[0], [k for k, _ in ours[1]], ours[2]) == (
        theirs[0],
        [k for k, _ in theirs[1]],
        theirs[2],
    )


def test_settings_that_change_django_s_answer_send_every_request_to_django(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"feature": "chat", "model": world.model.name, "input_tokens": 1, "max_output_tokens": 1}
    for override in (
        {"SECURE_SSL_REDIRECT": True},
        {"PREPEND_WWW": True},
        {"DISALLOWED_USER_AGENTS": [re.compile("curl")]},
        {"DISALLOWED_USER_AGENTS": []},  # empty: still served in front
        {"MIDDLEWARE": ["django.middleware.common.CommonMiddleware"]},
    ):
        with override_settings(**override):
            app = FastPath(application.django)
            served: list[str] = []

            def django(environ: Any, start_response: Any, seen: list[str] = served) -> Any:
                seen.append(environ["PATH_INFO"])
                start_response("204 No Content", [])
                return [b""]

            monkeypatch.setattr(app, "django", django)
            status, _, _ = call(app, RESERVATIONS, body, secret=world.secret)
            if override == {"DISALLOWED_USER_AGENTS": []}:
                assert (served, status) == ([], "201 Created")
            else:
                assert (served, status) == ([RESERVATIONS], "204 No Content"), override


def test_signals_and_logging_as_after_any_django_request(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []

    def started(**kwargs: Any) -> None:
        events.append("started")

    def finished(**kwargs: Any) -> None:
        events.append("finished")

    signals.request_started.connect(started)
    signals.request_finished.connect(finished)
    try:
        with caplog.at_level(logging.WARNING, logger="django.request"):
            status, _, _ = call(application, RESERVATIONS, {"feature": "chat"}, secret="qk_x_y")
    finally:
        signals.request_started.disconnect(started)
        signals.request_finished.disconnect(finished)

    assert status == "401 Unauthorized"
    assert events == ["started", "finished"]
    assert [r.getMessage() for r in caplog.records if r.name == "django.request"] == [
        f"Unauthorized: {RESERVATIONS}"
    ]


@pytest.mark.parametrize(
    "path",
    [
        f"{RESERVATIONS}/rsv_\N{SNOWMAN}/release",
        f"{RESERVATIONS}/rsv_caf\N{LATIN SMALL LETTER E WITH ACUTE}/release",
    ],
    ids=["snowman", "latin-1"],
)
@pytest.mark.parametrize(
    "meta",
    [
        {"HTTP_COOKIE": "AWSALB=sticky"},
        {"HTTP_COOKIE": "csrftoken=bad"},
        {"HTTP_HOST": "evil.example"},
    ],
    ids=["balancer-cookie", "csrf-cookie", "bad-host"],
)
def test_a_path_that_is_not_ascii_reaches_the_view_and_the_log_as_with_django(
    world: World, caplog: pytest.LogCaptureFixture, path: str, meta: dict[str, str]
) -> None:
    answers, logged = [], []
    for app in (application.django, application):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="django.request"):
            answers.append(call(app, path, secret=world.secret, **meta))
        logged.append([r.getMessage() for r in caplog.records if r.name == "django.request"])

    theirs, ours = answers
    assert theirs[0] == ("400 Bad Request" if "HTTP_HOST" in meta else "404 Not Found")
    if "csrftoken" not in meta.get("HTTP_COOKIE", ""):  # a new CSRF cookie differs each time
        assert ours == theirs
    assert ours[0] == theirs[0] and ours[2] == theirs[2]
    assert logged[1] == logged[0]


def test_the_answer_goes_out_before_request_finished_whose_failure_changes_nothing(
    world: World,
) -> None:

    def failing(**kwargs: Any) -> None:
        raise RuntimeError("receiver failed")

    signals.request_finished.connect(failing)
    try:
        answers = [
            call(app, RESERVATIONS, reserve_body(world), secret=world.secret)
            for app in (application.django, application)
        ]
    finally:
        signals.request_finished.disconnect(failing)

    assert [status for status, _, _ in answers] == ["201 Created", "201 Created"]


def test_an_error_escaping_the_view_is_the_api_s_json_500_as_with_django(
    world: World, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from quotas.api import views

    def broken(body: Any) -> bytes:
        raise ValueError("cannot render")

    monkeypatch.setattr(views, "_render", broken)
    answers, logged = [], []
    for app in (application.django, application):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="django.request"):
            answers.append(call(app, RESERVATIONS, reserve_body(world), secret=world.secret))
        logged.append([r.getMessage() for r in caplog.records if r.name == "django.request"])

    theirs, ours = answers
    assert theirs[0] == "500 Internal Server Error"
    assert json.loads(theirs[2])["error"] == "internal_error"
    assert ours == theirs
    assert logged[1] == logged[0] == [f"Internal Server Error: {RESERVATIONS}"]


def test_request_signals_are_sent_by_django_s_handler_class(world: World) -> None:
    events: list[str] = []

    def started(**kwargs: Any) -> None:
        events.append("started")

    def finished(**kwargs: Any) -> None:
        events.append("finished")

    signals.request_started.connect(started, sender=WSGIHandler)
    signals.request_finished.connect(finished, sender=WSGIHandler)
    try:
        runs = []
        for app in (application.django, application):
            events.clear()
            call(app, RESERVATIONS, reserve_body(world), secret=world.secret)
            runs.append(list(events))
    finally:
        signals.request_started.disconnect(started, sender=WSGIHandler)
        signals.request_finished.disconnect(finished, sender=WSGIHandler)

    assert runs == [["started", "finished"], ["started", "finished"]]


def test_a_body_past_the_upload_limit_is_a_400_that_says_so(world: World) -> None:
    body = reserve_body(world, prompt="y" * 3_000_000)
    del body["input_tokens"]
    answers = [
        call(app, RESERVATIONS, body, secret=world.secret)
        for app in (application.django, application)
    ]

    assert answers[0] == answers[1]
    assert answers[0][0] == "400 Bad Request"
    assert "larger than 2,621,440 bytes" in json.loads(answers[0][2])["message"]


def test_a_404_escaping_the_view_is_logged_as_django_logs_it(
    world: World, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`response_for_exception` logs every exception it answers but Http404, which Django's
    handler logs afterwards ("Not Found: <path>")."""
    from quotas.api import views

    def gone(body: Any) -> bytes:
        raise Http404("gone")

    monkeypatch.setattr(views, "_render", gone)
    body = reserve_body(world)
    answers, logged = [], []
    for app in (application.django, application):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="django.request"):
            answers.append(served(app, environ_for(RESERVATIONS, body, secret=world.secret)))
        logged.append([r.getMessage() for r in caplog.records if r.name == "django.request"])

    theirs, ours = answers
    assert theirs[0] == "404 Not Found"
    assert ours == theirs
    assert logged[0] == [f"Not Found: {RESERVATIONS}"]
    assert logged[1] == logged[0]


def test_a_header_value_django_accepts_is_sent_as_django_sends_it(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Django's response headers take a value that is not a str as its str."""
    from quotas.api import views

    monkeypatch.setattr(views, "ratelimit_headers", lambda limits: {"RateLimit-Reset": 5})
    body = reserve_body(world)
    theirs, ours = (
        served(app, environ_for(RESERVATIONS, body, secret=world.secret))
        for app in (application.django, application)
    )

    assert theirs[0] == "201 Created"
    assert ("RateLimit-Reset", "5") in theirs[1]
    assert ours[0] == theirs[0]
    assert ours[1] == theirs[1]


def test_an_error_while_logging_a_4xx_fails_as_in_django(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Django logs a 4xx outside its middleware chain: an exception from logging (here a
    raising filter) reaches the server, with no `got_request_exception`."""

    class Failing(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.levelno == logging.WARNING:
                raise RuntimeError("log filter failed")
            return True

    logger = logging.getLogger("django.request")
    failing = Failing()
    events: list[list[str]] = []

    def got(**kwargs: Any) -> None:
        events[-1].append("got_request_exception")

    logger.addFilter(failing)
    signals.got_request_exception.connect(got)
    try:
        answers = []
        for app in (application.django, application):
            events.append([])
            answers.append(served(app, environ_for(RESERVATIONS, {}, secret="qk_x_y")))
    finally:
        logger.removeFilter(failing)
        signals.got_request_exception.disconnect(got)

    theirs, ours = answers
    assert theirs[0] == "500 Internal Server Error"  # gunicorn's page: Django raised
    assert events[1] == events[0] == []
    assert ours == theirs
