"""Loads the Lua scripts once and calls them by SHA, loading a script again on NOSCRIPT."""

from __future__ import annotations

import json
import os
import threading
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import redis
from redis.commands.core import Script
from redis.connection import ConnectionInterface
from redis.exceptions import MaxConnectionsError, NoScriptError

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
    """Calls the engine's scripts, one EVALSHA each.

    The calls go out on connections kept for them (`Connections`) rather than through
    `redis.Redis.execute_command`, which per command also dispatches pool events and records
    metrics for redis-py's observability hooks, wraps the call in its retry machinery and
    checks its arguments: together about as much CPU as packing, sending and reading the
    call. What the client's own path guarantees is kept: the client's connection settings
    (timeouts, health checks of idle connections, no retries), a connection with unread data
    or closed by the server replaced before use, a connection dropped on any error while
    sending or reading (and opened again on the next call), the same exceptions
    (`redis.ConnectionError`, `redis.TimeoutError`, `redis.ResponseError` for a script's
    error), and a script that Redis no longer holds (a restart, SCRIPT FLUSH) loaded again
    and the call made once more. A client that is not a plain `redis.Redis` on a connection
    pool (a Redis Cluster client, which routes each call to its key's node) is called the
    client's own way."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._scripts: dict[str, Script] = {
            name: client.register_script(script_source(name)) for name in SCRIPT_NAMES
        }
        pool = getattr(client, "connection_pool", None)
        self._connections: Connections | None = None
        if isinstance(client, redis.Redis) and isinstance(pool, redis.ConnectionPool):
            self._connections = Connections(pool)

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
        script = self._scripts[name]
        if self._connections is None:
            reply = script(keys=keys, args=[arg, *extra])
        else:
            reply = self._call_kept(self._connections, script, keys, arg, extra)
        return reply if isinstance(reply, int) else json_decode(reply)

    def _call_kept(
        self,
        connections: Connections,
        script: Script,
        keys: list[str],
        arg: bytes | str,
        extra: tuple[bytes | str, ...],
    ) -> Any:
        connection = connections.take()
        try:
            try:
                return _evalsha(connection, script.sha, keys, arg, extra)
            except NoScriptError:
                script.sha = self._client.script_load(script.script)
                return _evalsha(connection, script.sha, keys, arg, extra)
        finally:
            connections.give(connection)


def _evalsha(
    connection: ConnectionInterface,
    sha: str,
    keys: list[str],
    arg: bytes | str,
    extra: tuple[bytes | str, ...],
) -> Any:
    # A reply that is an error is read whole before it is raised, so the connection stays
    # usable; redis-py drops the connection itself on a socket error or an interruption.
    connection.send_command("EVALSHA", sha, len(keys), *keys, arg, *extra)
    return connection.read_response()


class Connections:
    """Connections for the engine's calls, made with the settings of a client's pool (its
    connection class and arguments) and kept here rather than in that pool, so they close
    when dropped with their engine. Each call takes one and gives it back, so a process holds
    as many as it makes calls at once (one per sync worker, one per thread of a threaded
    one), and at most the pool's `max_connections`, as the pool would; a forked child never
    uses its parent's."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self._pool = pool
        self._idle: list[ConnectionInterface] = []
        self._made = 0
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def take(self) -> ConnectionInterface:
        if self._pid != os.getpid():
            self._idle, self._made, self._pid = [], 0, os.getpid()
        try:
            connection = self._idle.pop()  # atomic: no two threads get the same one
        except IndexError:
            connection = self._make()
        try:
            _ready(connection)
        except BaseException:
            self._idle.append(connection)
            raise
        return connection

    def give(self, connection: ConnectionInterface) -> None:
        self._idle.append(connection)

    def _make(self) -> ConnectionInterface:
        with self._lock:
            if self._made >= self._pool.max_connections:
                raise MaxConnectionsError("Too many connections")
            self._made += 1
        return self._pool.connection_class(**self._pool.connection_kwargs)


def _ready(connection: ConnectionInterface) -> None:
    """Connected, with nothing left to read: as the pool hands out its connections. A
    connection that the server closed, or with a reply left unread, is opened again."""
    connection.connect()  # nothing to do when connected
    try:
        if connection.can_read():
            raise redis.ConnectionError("Connection has data")
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        connection.disconnect()
        connection.connect()
        if connection.can_read():
            raise redis.ConnectionError("Connection not ready") from None


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
