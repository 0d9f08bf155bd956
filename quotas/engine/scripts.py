"""Loads the Lua scripts once and calls them by SHA (redis-py reloads them on NOSCRIPT)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import redis
from redis.commands.core import Script

LUA_DIR = Path(__file__).resolve().parent.parent / "lua"
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
)


@cache
def script_source(name: str) -> str:
    """The shared library followed by the script: Lua scripts cannot include one another."""
    return (LUA_DIR / "lib.lua").read_text() + "\n" + (LUA_DIR / f"{name}.lua").read_text()


class Scripts:
    def __init__(self, client: redis.Redis) -> None:
        self._scripts: dict[str, Script] = {
            name: client.register_script(script_source(name)) for name in SCRIPT_NAMES
        }

    def call(
        self,
        name: str,
        keys: list[str],
        payload: bytes | str | dict[str, Any],
        *extra: bytes | str,
    ) -> Any:
        """One EVALSHA; the reply is the JSON the script encoded. `extra` arguments follow
        the payload (ARGV[2] on)."""
        arg = payload if isinstance(payload, bytes | str) else json_encode(payload)
        reply = self._scripts[name](keys=keys, args=[arg, *extra])
        return reply if isinstance(reply, int) else json_decode(reply)


def json_encode(value: Any) -> bytes:
    """Compact JSON for a script. cjson reads orjson's output as it read json's (non-ASCII
    raw instead of escaped, floats in their shortest form); what orjson refuses (integers
    past 64 bits, lone surrogates, other types) and any NaN or Infinity (orjson would
    write null, json wrote NaN) is written by json, as before."""
    try:
        data = orjson.dumps(value)
    except orjson.JSONEncodeError:
        return _json_dumps(value)
    if b"null" in data:
        return _json_dumps(value)
    return data


def _json_dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def json_decode(reply: bytes | str) -> Any:
    """A script's reply. cjson writes numbers with 14 significant digits, so orjson reads
    the same values json does; what it refuses is read by json, as before."""
    try:
        return orjson.loads(reply)
    except orjson.JSONDecodeError:
        return json.loads(reply)
