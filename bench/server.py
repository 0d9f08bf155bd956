"""The application under test: gunicorn with the bench settings, in its own process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).parent / "gunicorn"
LOG = ROOT / "var" / "bench-gunicorn.log"


@dataclass(frozen=True)
class ServerOptions:
    port: int
    workers: int
    worker_class: str
    threads: int

    def describe(self) -> str:
        threads = f" x {self.threads} threads" if self.worker_class == "gthread" else ""
        return f"gunicorn {self.worker_class}, {self.workers} workers{threads}"


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    options: ServerOptions

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _command(options: ServerOptions) -> list[str]:
    command = [
        str(GUNICORN),
        "config.wsgi:application",
        "--config=python:config.gunicorn",
        f"--workers={options.workers}",
        f"--worker-class={options.worker_class}",
        f"--bind=127.0.0.1:{options.port}",
        "--log-level=warning",
        "--backlog=4096",
    ]
    if options.worker_class == "gthread":
        command.append(f"--threads={options.threads}")
    if _has_control_socket():
        command.append(f"--control-socket={ROOT / 'var' / f'bench-gunicorn-{options.port}.ctl'}")
    return command


def _has_control_socket() -> bool:
    help_text = subprocess.run([str(GUNICORN), "--help"], capture_output=True, text=True).stdout
    return "--control-socket" in help_text


def server_start(options: ServerOptions, env: dict[str, str]) -> Server:
    LOG.parent.mkdir(exist_ok=True)
    with LOG.open("ab") as log:
        process = subprocess.Popen(
            _command(options),
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(process, options)
    _wait_for_port(server)
    return server


def _wait_for_port(server: Server, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            sys.exit(f"gunicorn exited with {server.process.returncode}; see {LOG}")
        try:
            socket.create_connection(("127.0.0.1", server.options.port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    server.stop()
    sys.exit(f"gunicorn did not listen on port {server.options.port}; see {LOG}")
