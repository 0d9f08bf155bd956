"""gunicorn's settings (config/gunicorn.py): a sync worker never waits on a connection that
has sent nothing."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.conf import settings

import quotas.store
from config.gunicorn import defer_accept, worker_exit
from quotas.degraded import spool_event, spool_size
from quotas.engine.core import Engine
from quotas.store import get_engine, redis_client
from tests.fixtures import DEAD_STORE

ROOT = Path(__file__).resolve().parents[2]
GUNICORN = Path(sys.executable).parent / "gunicorn"
linux_only = pytest.mark.skipif(
    not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="TCP_DEFER_ACCEPT is Linux's"
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@functools.cache
def _own_options() -> list[str]:
    """gunicorn 27 opens a control socket shared by every instance unless told not to."""
    help_text = subprocess.run([str(GUNICORN), "--help"], capture_output=True, text=True).stdout
    return ["--no-control-socket"] if "--no-control-socket" in help_text else []


@contextmanager
def _gunicorn(*options: str) -> Iterator[int]:
    """One sync worker serving tests/fakes/hello_wsgi.py; yields its port once it answers."""
    port = _free_port()
    process = subprocess.Popen(
        [
            str(GUNICORN),
            "tests.fakes.hello_wsgi:app",
            "--workers=1",
            f"--bind=127.0.0.1:{port}",
            "--log-level=warning",
            *_own_options(),
            *options,
        ],
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert _get(port, timeout=1).startswith(b"HTTP/1.1 200")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield port
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def _get(port: int, timeout: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        return client.recv(1024)


@linux_only
def test_a_listening_tcp_socket_hands_over_connections_once_they_carry_data():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 0
        assert defer_accept(listener)
        # the kernel keeps it as a count of SYN-ACK retransmissions, read back as seconds
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0


def test_a_unix_socket_is_left_alone(tmp_path):
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "sock"))
        assert not defer_accept(listener)


@linux_only
def test_a_silent_connection_does_not_hold_the_only_worker():
    with (
        _gunicorn("--config=python:config.gunicorn") as port,
        socket.create_connection(("127.0.0.1", port)),  # connected, sends nothing
    ):
        time.sleep(0.2)
        assert _get(port, timeout=10).startswith(b"HTTP/1.1 200")


@linux_only
def test_without_the_settings_a_silent_connection_holds_the_only_worker():
    """What the setting prevents, so that the test above can tell it apart."""
    with _gunicorn() as port, socket.create_connection(("127.0.0.1", port)):
        time.sleep(0.2)
        with pytest.raises(TimeoutError):
            _get(port, timeout=2)


def test_a_worker_leaving_writes_the_degraded_events_it_still_holds(caplog):
    engine = get_engine()
    spool_event({"type": "reserved", "rid": "rsv_d_1.2.3-left", "degraded": 1})

    worker_exit(None, None)

    assert spool_size() == 0
    events = engine.client.xrange(engine.keys.events)
    assert [fields[b"rid"] for _, fields in events] == [b"rsv_d_1.2.3-left"]
    assert "degraded events" not in caplog.text


def test_a_worker_leaving_while_the_store_is_down_says_what_it_could_not_write(monkeypatch, caplog):
    dead = Engine(redis_client(DEAD_STORE), hash_tag=settings.QUOTA_HASH_TAG)
    monkeypatch.setattr(quotas.store, "get_engine", lambda: dead)
    spool_event({"type": "reserved", "rid": "rsv_d_1.2.3-kept", "degraded": 1})

    worker_exit(None, None)

    assert spool_size() == 1
    assert "a worker exits with 1 degraded events the store did not take" in caplog.text
