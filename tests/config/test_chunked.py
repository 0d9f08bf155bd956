"""Chunked request bodies (config/chunked.py): read under gunicorn, which decodes them, and
refused as JSON by a server that does not; never dropped unread."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings

from config.chunked import ChunkedBodies
from tests.config.test_gunicorn import GUNICORN, ROOT, _free_port, _own_options
from tests.fixtures import World
from tests.ledger.stack import Ledger
from tests.ledger.test_worker import worker_database

__all__ = ["worker_database"]  # the fixture, for the tests here

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
RESERVATIONS = "/api/v1/reservations"


@pytest.fixture
def server(world: World, worker_database: Ledger) -> Iterator[int]:
    """The app under gunicorn with one sync worker, on the world's database and Redis."""
    port = _free_port()
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": worker_database.url,
        "REDIS_URL": settings.REDIS_URL,
    }
    command = [str(GUNICORN), "config.wsgi:application", "--workers=1", f"--bind=127.0.0.1:{port}"]
    process = subprocess.Popen(
        [*command, "--log-level=warning", *_own_options()],
        cwd=ROOT,
        env=environment,
        start_new_session=True,
    )
    try:
        _wait_for(port, process)
        yield port
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def _wait_for(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def chunked(port: int, path: str, secret: str, body: bytes, size: int = 7) -> tuple[int, Any]:
    """POST `body` in chunks of `size` bytes with no Content-Length, over a raw socket; the
    answer's status and JSON."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {secret}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(head + chunks + b"0\r\n\r\n")
        answer = b""
        while data := client.recv(65536):
            answer += data
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def _reserve(world: World) -> bytes:
    body = {"feature": "chat", "model": world.model.name, "input_tokens": 5}
    return json.dumps({**body, "max_output_tokens": 5}).encode()


def test_a_chunked_reservation_is_read_and_granted(world: World, server: int) -> None:
    status, body = chunked(server, RESERVATIONS, world.secret, _reserve(world))

    assert status == 201, body
    assert body["status"] == "held" and body["reserved"]["input_tokens"] == 5


def test_a_chunked_release_is_refused_for_what_its_body_says(world: World, server: int) -> None:
    status, reserved = chunked(server, RESERVATIONS, world.secret, _reserve(world))
    assert status == 201, reserved
    path = f"{RESERVATIONS}/{reserved['id']}"

    status, refused = chunked(server, path + "/release", world.secret, b'{"bogus": 1}')

    assert (status, refused["error"], set(refused["fields"])) == (400, "invalid_request", {"bogus"})
    assert world.client().get(path).json()["status"] == "held"
    status, released = chunked(server, path + "/release", world.secret, b"{}")
    assert (status, released["status"]) == (200, "released")


def test_a_chunked_body_past_the_upload_limit_is_refused_as_one(world: World, server: int) -> None:
    prompt = "y" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)
    body = json.dumps({"feature": "chat", "model": world.model.name, "prompt": prompt})

    status, refused = chunked(server, RESERVATIONS, world.secret, body.encode(), size=65536)

    assert (status, refused["error"]) == (400, "invalid_request")
    assert f"larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE:,} bytes" in refused["message"]


def test_a_server_that_does_not_decode_chunked_bodies_gets_a_json_411() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise AssertionError("the request reached the app with a body it could not read")

    answered: list[str] = []
    environ = {"HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input": io.BytesIO(b"5\r\nhello")}

    body = b"".join(ChunkedBodies(app)(environ, lambda status, headers: answered.append(status)))

    assert answered == ["411 Length Required"]
    assert json.loads(body)["error"] == "length_required"
