"""More requests and settings under which the deployed application (`quotas.api.wsgi.FastPath`
in front of Django) answers exactly as Django's handler does: odd lengths, methods, paths and
keys; proxies, HTTPS and security settings; the middleware probe under threads."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import pytest
from django.core import signals
from django.core.handlers.wsgi import WSGIHandler
from django.test import override_settings

from config.wsgi import application
from quotas.api.wsgi import FastPath
from tests.fakes.wsgi import RESERVATIONS, environ_for, reserve_body, same_start, served
from tests.fixtures import World

pytestmark = pytest.mark.usefixtures("connections_kept")


def environ(path: str | bytes, raw: bytes, **meta: Any) -> dict[str, Any]:
    """A JSON POST of `raw`, its length stated unless `meta` says otherwise."""
    stated = {"CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(raw)), **meta}
    return environ_for(path, raw=raw, **stated)


def both(
    world: World,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    path: str | bytes,
    raw: bytes,
    django: Any = None,
    fast: Any = None,
    **meta: Any,
) -> list[tuple[Any, list[str]]]:
    """The answer and the `django.request` log lines of Django's handler, then of the fast
    path, each from the same ids, clock and empty store."""
    meta.setdefault("HTTP_AUTHORIZATION", f"Bearer {world.secret}")
    runs = []
    for app in (django or application.django, fast or application):
        same_start(monkeypatch)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="django.request"):
            answer = served(app, environ(path, raw, **meta))
        runs.append(
            (answer, [r.getMessage() for r in caplog.records if r.name == "django.request"])
        )
    return runs


def body(world: World, **extra: Any) -> bytes:
    return json.dumps(reserve_body(world, input_tokens=5, max_output_tokens=5, **extra)).encode()


CASES = {
    "lowercase-method": lambda w: (RESERVATIONS, body(w), {"REQUEST_METHOD": "post"}),
    "content-length-invalid": lambda w: (RESERVATIONS, body(w), {"CONTENT_LENGTH": "abc"}),
    "content-length-negative": lambda w: (RESERVATIONS, body(w), {"CONTENT_LENGTH": "-1"}),
    "content-length-missing-chunked": lambda w: (
        RESERVATIONS,
        body(w),
        {"CONTENT_LENGTH": None, "wsgi.input_terminated": True},
    ),
    "body-shorter-than-length": lambda w: (RESERVATIONS, body(w)[:-3], {"CONTENT_LENGTH": "999"}),
    "http-content-length-only": lambda w: (
        RESERVATIONS,
        body(w),
        {"CONTENT_LENGTH": None, "HTTP_CONTENT_LENGTH": "40"},
    ),
    "accept-json": lambda w: (RESERVATIONS, body(w), {"HTTP_ACCEPT": "application/json"}),
    "auth-latin-1": lambda w: (
        RESERVATIONS,
        body(w),
        {"HTTP_AUTHORIZATION": "Bearer qk_\xe9\xe9_x"},
    ),
    "non-ascii-id-no-cookie": lambda w: (
        f"{RESERVATIONS}/rsv_caf\u00e9\u2603/release",
        b"",
        {"CONTENT_LENGTH": None},
    ),
    "percent-broken-utf8-id": lambda w: (
        RESERVATIONS.encode() + b"/rsv_\xff/commit",
        b'{"input_tokens": 1, "output_tokens": 1}',
        {},
    ),
    "script-name": lambda w: (RESERVATIONS + "/x/release", b"", {"SCRIPT_NAME": "/quota"}),
    "x-forwarded-host-ignored": lambda w: (
        RESERVATIONS,
        body(w),
        {"HTTP_X_FORWARDED_HOST": "evil.example"},
    ),
    "oversized-body": lambda w: (
        RESERVATIONS,
        body(w, metadata={"x": "y" * 3_000_000}),
        {},
    ),
    "unknown-key": lambda w: (RESERVATIONS, body(w), {"HTTP_AUTHORIZATION": "Bearer qk_a_b"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_answered_as_django_answers(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    path, raw, meta = CASES[case](world)
    served_by_django: list[str] = []
    django = application.django
    monkeypatch.setattr(
        application, "django", lambda e, s: served_by_django.append("x") or django(e, s)
    )
    theirs, ours = both(world, monkeypatch, caplog, path, raw, django=django, **meta)
    assert served_by_django == []  # answered by FastPath itself
    assert ours == theirs


@pytest.mark.parametrize(
    "overrides, meta",
    [
        ({"FORCE_SCRIPT_NAME": "/quota"}, {}),
        ({"USE_X_FORWARDED_HOST": True}, {"HTTP_X_FORWARDED_HOST": "localhost"}),
        ({"USE_X_FORWARDED_HOST": True}, {"HTTP_X_FORWARDED_HOST": "evil.example"}),
        (
            {
                "SECURE_PROXY_SSL_HEADER": ("HTTP_X_FORWARDED_PROTO", "https"),
                "SECURE_HSTS_SECONDS": 3600,
                "SECURE_HSTS_PRELOAD": True,
            },
            {"HTTP_X_FORWARDED_PROTO": "https"},
        ),
        (
            {
                "SECURE_PROXY_SSL_HEADER": ("HTTP_X_FORWARDED_PROTO", "https"),
                "SECURE_HSTS_SECONDS": 3600,
                "SECURE_SSL_REDIRECT": True,
            },
            {"HTTP_X_FORWARDED_PROTO": "https"},
        ),
        ({"SECURE_HSTS_SECONDS": 3600}, {"wsgi.url_scheme": "https", "SERVER_PORT": "443"}),
        ({"X_FRAME_OPTIONS": "SAMEORIGIN", "SECURE_CROSS_ORIGIN_OPENER_POLICY": None}, {}),
        ({"APPEND_SLASH": False}, {}),
    ],
)
def test_settings_answered_as_django_answers(
    world: World,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    overrides: dict[str, Any],
    meta: dict[str, Any],
) -> None:
    with override_settings(**overrides):
        handler = WSGIHandler()  # its middleware reads the overridden settings
        fast = FastPath(handler)
        for path, raw in (
            (RESERVATIONS, body(world)),
            (RESERVATIONS + "/rsv_000000000000000000000000/extend", b'{"ttl_seconds": 5}'),
        ):
            theirs, ours = both(
                world, monkeypatch, caplog, path, raw, django=handler, fast=fast, **meta
            )
            assert ours == theirs


def test_the_probe_under_threads(world: World) -> None:
    """A fresh FastPath hit by many threads at once: every answer carries the same headers."""
    fast = FastPath(application.django)
    results: list[Any] = []
    start = threading.Barrier(8)

    def one() -> None:
        start.wait()
        results.append(served(fast, environ(RESERVATIONS, b"{}", HTTP_AUTHORIZATION="Bearer x y")))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({(s, tuple(h)) for s, h, _ in results}) == 1


def test_a_failing_request_started_receiver_fails_both_alike(world: World) -> None:
    """Django sends request_started outside any try too: both raise before start_response."""

    def failing(**kwargs: Any) -> None:
        raise RuntimeError("receiver failed")

    signals.request_started.connect(failing)
    try:
        answers = [
            served(app, environ(RESERVATIONS, body(world), HTTP_AUTHORIZATION="Bearer x y"))
            for app in (application.django, application)
        ]
    finally:
        signals.request_started.disconnect(failing)
    assert answers[0] == answers[1]
    assert answers[0][0] == "500 Internal Server Error"
