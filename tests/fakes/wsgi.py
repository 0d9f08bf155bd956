"""Requests to a WSGI application made as gunicorn makes them, for the tests that compare
the deployed application (`config.wsgi.application`) with Django's handler."""

from __future__ import annotations

import io
import itertools
import json
from typing import Any

import pytest

RESERVATIONS = "/api/v1/reservations"
NOW_MS = 1_790_000_000_000

# what gunicorn sends when the application raises before start_response
GUNICORN_500 = ("500 Internal Server Error", [("Content-Type", "text/html")], b"<html>")
Answer = tuple[str, list[tuple[str, str]], bytes]


def environ_for(
    path: str | bytes,
    body: Any = None,
    *,
    raw: bytes | None = None,
    method: str = "POST",
    content_type: str = "application/json",
    query: str = "",
    host: str = "testserver",
    secret: str | None = None,
    **meta: Any,
) -> dict[str, Any]:
    """A request's environ. PATH_INFO holds the path's bytes read as latin-1 (PEP 3333); a
    `meta` value of None leaves that key out."""
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": (path if isinstance(path, bytes) else path.encode()).decode("latin-1"),
        "SCRIPT_NAME": "",
        "QUERY_STRING": query,
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "HTTP_HOST": host,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "10.1.2.3",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(data),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    if data or content_type != "application/json":
        environ["CONTENT_TYPE"] = content_type
        environ["CONTENT_LENGTH"] = str(len(data))
    if secret is not None:
        environ["HTTP_AUTHORIZATION"] = f"Bearer {secret}"
    environ.update(meta)
    return {k: v for k, v in environ.items() if v is not None}


def served(app: Any, environ: dict[str, Any]) -> Answer:
    """What the client receives: the status, headers and body the application sent, or
    gunicorn's HTML 500 when it raised before sending them. An error while closing the
    answer (after it went out) is only logged by gunicorn."""
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        seen["status"], seen["headers"] = status, list(headers)

    try:
        out = app(environ, start_response)
        content = b"".join(out)
    except Exception:
        if "status" in seen:
            raise
        return GUNICORN_500
    try:
        if hasattr(out, "close"):
            out.close()
    except Exception:
        pass
    return seen["status"], seen["headers"], content


def same_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reservation ids counted from zero, an empty store, a plan read afresh and the engine's
    clock stopped at NOW_MS: two applications given the same requests after this answer the
    same bytes."""
    import quotas.reservations as reservations
    from quotas.plan import plans
    from quotas.store import get_redis

    counter = itertools.count()
    monkeypatch.setattr(reservations.secrets, "token_hex", lambda n: f"{next(counter):0{2 * n}x}")
    get_redis().flushdb()
    plans.clear()
    reservations.get_engine().frozen_ms = NOW_MS


def reserve_body(world: Any, **extra: Any) -> dict[str, Any]:
    """A reservation of the chat feature, as the tests' `world` sets it up."""
    return {
        "feature": "chat",
        "model": world.model.name,
        "input_tokens": 10,
        "max_output_tokens": 10,
        **extra,
    }
