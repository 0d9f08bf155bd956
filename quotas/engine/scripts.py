"""The engine's Lua scripts, registered with redis-py: each call is one EVALSHA on the
client's own connections, and redis-py loads a script again when Redis no longer holds it (a
restart, SCRIPT FLUSH)."""

from __future__ import annotations

import json
import time
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import redis

from quotas.metrics import REDIS_ERRORS, SCRIPT_SECONDS

LUA_DIR = Path(__file__).resolve().parent.parent / "lua"
LIBRARIES = ("lib", "allot", "pressure", "line")  # prepended to every script, in this order
SCRIPT_NAMES = (
    "reserve",
    "commit",
    "release",
    "extend",
    "peek",
    "reap",
    "inspect",
    "held",
    "snapshot",
    "trim",
    "rebuild",
    "allot_move",
    "spread",
)


@cache
def script_source(name: str) -> str:
    """The shared libraries followed by the script: Lua scripts cannot include one another."""
    return "\n".join((LUA_DIR / f"{part}.lua").read_text() for part in (*LIBRARIES, name))


class Scripts:
    """The engine's scripts on one client. Every script takes one JSON object (ARGV[1]) and
    answers JSON, or a plain integer."""

    def __init__(self, client: redis.Redis) -> None:
        self._scripts = {name: client.register_script(script_source(name)) for name in SCRIPT_NAMES}
        # the labelled children, looked up once: a call only observes
        self._seconds = {name: SCRIPT_SECONDS.labels(name) for name in SCRIPT_NAMES}

    def call(self, name: str, keys: list[str], payload: dict[str, Any]) -> Any:
        args = [_encode(payload)]
        started = time.perf_counter()
        try:
            reply = self._scripts[name](keys=keys, args=args)
        except redis.RedisError as exc:
            REDIS_ERRORS.labels(name, type(exc).__name__).inc()
            raise
        self._seconds[name].observe(time.perf_counter() - started)
        return reply if isinstance(reply, int) else orjson.loads(reply)

    def sha(self, name: str) -> str:
        return str(self._scripts[name].sha)


def _encode(payload: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError:  # an integer past 64 bits (a budget counted in nano-USD)
        return json.dumps(payload, separators=(",", ":")).encode()
