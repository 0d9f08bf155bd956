"""The one Redis client and engine of the process, and the config version that invalidates
caches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, TypeVar, cast

import redis
from django.conf import settings
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from quotas.engine import Engine
from quotas.engine.core import KeySpace


class StoreBusyError(redis.ResponseError):
    """`BUSY`: a script ran past Redis's busy threshold and every other call is refused until
    it ends or is killed. redis-py raises a bare ResponseError for it; the app's client raises
    this instead."""


# The errors that say the store cannot serve now: only these answer 503 or admit fail-open.
# Unreachable (connection refused, reset or timed out, or a server still loading its data),
# a replica that cannot take writes (a failover in progress), out of memory under
# `noeviction`, a cluster that is down or resharding, a slot the cluster client knows no master
# for (its map reloaded mid-failover) or a cluster it cannot reach at all, and a script holding
# the server (BUSY). Any other (a script's ResponseError) is a bug, answered as one, never
# retried as an outage.
STORE_UNREACHABLE = (
    redis.ConnectionError,  # BusyLoadingError too
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,  # MasterDownError too
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.RedisClusterUnreachableError,
    StoreBusyError,
)


T = TypeVar("T")
R = TypeVar("R")


def each_answering(
    items: Sequence[T],
    read: Callable[[T], R],
    *,
    left: Callable[[T, Exception], None] | None = None,
) -> list[R]:
    """`read` of each item (a partition, its stream) whose store answers: one whose store
    cannot serve (a shard failing over) is left out, and handed to `left` with its error;
    raises the first such error when none answered."""
    answers, errors = [], []
    for item in items:
        try:
            answers.append(read(item))
        except STORE_UNREACHABLE as exc:
            if left is not None:
                left(item, exc)
            errors.append(exc)
    if errors and len(errors) == len(items):
        raise errors[0]
    return answers


def _busy(exc: redis.ResponseError) -> bool:
    return type(exc) is redis.ResponseError and str(exc).startswith("BUSY ")


class StoreClient(redis.Redis):
    """redis.Redis that tells a BUSY reply from other errors (see StoreBusyError)."""

    def parse_response(self, connection: Any, command_name: str | bytes, **options: Any) -> Any:
        try:
            return super().parse_response(connection, command_name, **options)
        except redis.ResponseError as exc:
            if _busy(exc):
                raise StoreBusyError(*exc.args) from exc
            raise


class StoreCluster(RedisCluster):
    """RedisCluster that tells a BUSY reply of one of its nodes from other errors."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().execute_command(*args, **kwargs)
        except redis.ResponseError as exc:
            if _busy(exc):
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


def cluster_client(seeds: list[str]) -> RedisCluster:
    """A Redis Cluster client as the app makes them: the same timeouts as `redis_client`, and
    one retry, so that a shard failing over answers its pools' fail mode within a couple of
    seconds rather than stalling the request (the client learns the new master from the
    cluster's MOVED answers and its slot map, which it reloads after a connection error)."""
    nodes = []
    for seed in seeds:
        host, _, port = seed.strip().rpartition(":")
        nodes.append(ClusterNode(host or "127.0.0.1", int(port)))
    return StoreCluster(
        startup_nodes=nodes,
        socket_timeout=2.0,
        socket_connect_timeout=1.0,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 1),
    )


@lru_cache(maxsize=1)
def get_redis() -> redis.Redis:
    """The quota state's client: REDIS_URL's Redis, or the cluster of
    QUOTA_REDIS_CLUSTER_NODES (typed as redis.Redis: the commands the app uses are common)."""
    if settings.QUOTA_REDIS_CLUSTER_NODES:
        return cast(redis.Redis, cluster_client(settings.QUOTA_REDIS_CLUSTER_NODES))
    return redis_client(settings.REDIS_URL)


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    return Engine(
        get_redis(),
        hash_tag=settings.QUOTA_HASH_TAG,
        partitions=settings.QUOTA_PARTITIONS,
        retention_ms=settings.QUOTA_LEASE_RETENTION_SECONDS * 1000,
        stream_maxlen=settings.QUOTA_STREAM_MAXLEN,
        rebalance_ms=int(settings.QUOTA_REBALANCE_SECONDS * 1000),
    )


def config_version_key() -> str:
    """The home partition's version: the one processes read to know their plan is current."""
    return get_engine().keys.version


# A missing key is created only for the first configuration ever: in a store that lost its
# data the key stays missing, so the loss stays visible until the rebuild writes it back.
_BUMP = """
if redis.call('EXISTS', KEYS[1]) == 1 or ARGV[1] == 'first' then
  return redis.call('INCR', KEYS[1])
end
return 0
"""


# Another partition's version follows the home one: set to it unless missing (that partition
# lost its data) or already past it.
_FOLLOW = """
local stored = redis.call('GET', KEYS[1])
if (stored or ARGV[2] == 'first') and tonumber(stored or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 0
"""


def config_version_bump(stored: int | None = None) -> None:
    """`stored`: the database's version after its bump (None: unknown, then a missing key
    stays missing). The home partition's version is bumped, and every other partition's set
    to it (a script checks a request's plan against its own partition's version)."""
    first = "first" if stored is not None and stored <= 1 else "later"
    client, engine = get_redis(), get_engine()
    version = int(client.eval(_BUMP, 1, engine.keys.version, first))
    if version:
        for space in engine.spaces[1:]:
            client.eval(_FOLLOW, 1, space.version, version, first)


def config_version_read() -> int | None:
    """The version in Redis; None when there is none (never configured, or the data lost)."""
    raw = get_redis().get(config_version_key())
    return None if raw is None else int(raw)


def config_version_restore(space: KeySpace | None = None) -> bool:
    """Write a partition's version back once it is rebuilt, unless one is there already:
    Redis's clock in milliseconds, a number no process's plan holds, so that every process
    reloads once and decides again. Partitioned, every partition moves to that number (the
    plan's version is the home partition's)."""
    client, engine = get_redis(), get_engine()
    space = space or engine.keys
    seconds, micros = client.time()
    version = seconds * 1000 + micros // 1000
    written = bool(client.set(space.version, version, nx=True))
    if written and engine.partitioned:
        for other in engine.spaces:
            if other is not space:
                client.eval(_FOLLOW, 1, other.version, version, "later")
    return written
