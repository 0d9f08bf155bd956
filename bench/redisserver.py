"""A Redis of the benchmark's own, so that server-wide command counts are the benchmark's."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis

DIR = Path(__file__).resolve().parent.parent / "var" / "bench-redis"


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    url: str

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_start() -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("bench needs redis-server (Debian: apt-get install redis-server)")
    DIR.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    command = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(DIR),
        "--logfile",
        str(DIR / "redis.log"),
    ]
    server = RedisServer(
        subprocess.Popen(command, start_new_session=True), f"redis://127.0.0.1:{port}/0"
    )
    for _ in range(100):
        try:
            redis.Redis.from_url(server.url, socket_connect_timeout=0.2).ping()
            return server
        except redis.ConnectionError:
            time.sleep(0.05)
    server.stop()
    sys.exit(f"the benchmark's Redis did not start; see {DIR / 'redis.log'}")
