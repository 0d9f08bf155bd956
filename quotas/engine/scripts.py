"""Loads the Lua scripts once and calls them by SHA (redis-py reloads them on NOSCRIPT)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

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

    def call(self, name: str, keys: list[str], payload: str | dict[str, Any]) -> Any:
        """One EVALSHA; the reply is the JSON the script encoded."""
        arg = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
        reply = self._scripts[name](keys=keys, args=[arg])
        return reply if isinstance(reply, int) else json.loads(reply)
