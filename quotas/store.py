"""The one Redis client and engine of the process, and the config version that invalidates
caches."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import redis
from django.conf import settings

from quotas.engine import Engine


class StoreBusyError(redis.ResponseError):
    """`BUSY`: a script ran past Redis's busy threshold and every other call is refused until
    it ends or is killed. redis-py raises a bare ResponseError for it; the app's client raises
    this instead."""


# The errors that say the store cannot serve now: only these answer 503 or admit fail-open.
# Unreachable (connection refused, reset or timed out, or a server still loading its data),
# a replica that cannot take writes (a failover in progress), out of memory under
# `noeviction`, a cluster that is down or resharding, and a script holding the server (BUSY).
# Any other (a script's ResponseError) is a bug, answered as one, never retried as an outage.
STORE_UNREACHABLE = (
    redis.ConnectionError,  # BusyLoadingError too
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,  # MasterDownError too
    StoreBusyError,
)


class StoreClient(redis.Redis):
    """redis.Redis that tells a BUSY reply from other errors (see StoreBusyError)."""

    def parse_response(self, connection: Any, command_name: str | bytes, **options: Any) -> Any:
        try:
            return super().parse_response(connection, command_name, **options)
        except redis.ResponseError as exc:
            if type(exc) is redis.ResponseError and str(exc).startswith("BUSY "):
                raise StoreBusyError(*exc.args) from exc
            raise


def redis_client(url: str) -> redis.Redis:
    """A client as the app makes them. Built from a URL it carries no retry policy: a store
    that refuses connections is known at the first attempt, so a fail-open pool admits and a
    fail-closed one answers 503 at once (a client built as `redis.Redis(...)` would retry ten
    times with backoff, over four seconds); connections idle for 30 s are checked first."""
    return StoreClient.from_url(
        url, socket_timeout=2.0, socket_connect_timeout=1.0, health_check_interval=30
    )


@lru_cache(maxsize=1)
def get_redis() -> redis.Redis:
    return redis_client(settings.REDIS_URL)


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    return Engine(
        get_redis(),
        hash_tag=settings.QUOTA_HASH_TAG,
        retention_ms=settings.QUOTA_LEASE_RETENTION_SECONDS * 1000,
        stream_maxlen=settings.QUOTA_STREAM_MAXLEN,
    )


def config_version_key() -> str:
    return f"q:{{{settings.QUOTA_HASH_TAG}}}:config_version"


# A missing key is created only for the first configuration ever: in a store that lost its
# data the key stays missing, so the loss stays visible until the rebuild writes it back.
_BUMP = """
if redis.call('EXISTS', KEYS[1]) == 1 or ARGV[1] == 'first' then
  return redis.call('INCR', KEYS[1])
end
return 0
"""


def config_version_bump(stored: int | None = None) -> None:
    """`stored`: the database's version after its bump (None: unknown, then a missing key
    stays missing)."""
    first = "first" if stored is not None and stored <= 1 else "later"
    get_redis().eval(_BUMP, 1, config_version_key(), first)


def config_version_read() -> int | None:
    """The version in Redis; None when there is none (never configured, or the data lost)."""
    raw = get_redis().get(config_version_key())
    return None if raw is None else int(raw)


def config_version_restore() -> bool:
    """Write the version back once the store is rebuilt, unless one is there already: Redis's
    clock in milliseconds, a number no process's plan holds, so that every process reloads
    once and decides again."""
    client = get_redis()
    seconds, micros = client.time()
    return bool(client.set(config_version_key(), seconds * 1000 + micros // 1000, nx=True))
