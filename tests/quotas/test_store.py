"""A store that answers but cannot serve now (a read-only replica, out of memory, a script
holding it) is down like an unreachable one: 503 on a fail-closed pool, degraded admission on
a fail-open one. Against a redis-server of the test's own on a loopback port (7170-7179), or
a Redis Cluster of its own (tests/fakes/redis_cluster.py)."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings

import quotas.degraded
import quotas.reservations
from quotas.engine.core import Engine
from quotas.plan import plans
from quotas.store import StoreBusyError, cluster_client, redis_client
from tests.fakes.redis_cluster import RedisCluster
from tests.fakes.redis_server import RedisServer, free_port, wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is missing"
)
PORTS = range(7170, 7180)
SPIN = "local t = redis.call('TIME')[1] + 5 while tonumber(redis.call('TIME')[1]) < t do end"


@pytest.fixture
def own_store(world: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[redis.Redis]:
    """A redis-server of the test's own holding the plan's version, serving the engine."""
    store = RedisServer(tmp_path, PORTS)
    store.start()
    try:
        client = redis_client(store.url)
        engine = Engine(
            client, hash_tag=settings.QUOTA_HASH_TAG, partitions=settings.QUOTA_PARTITIONS
        )
        for space in engine.spaces:  # each partition checks a plan against its own copy
            client.set(space.version, plans.get().version)
        monkeypatch.setattr(quotas.reservations, "get_engine", lambda: engine)
        quotas.degraded._spool.clear()
        yield client
    finally:
        quotas.degraded._spool.clear()
        store.stop()


def read_only(client: redis.Redis) -> None:
    """A replica of a master that is not there: it keeps its data and refuses writes."""
    port = client.connection_pool.connection_kwargs["port"]
    client.replicaof("127.0.0.1", free_port(PORTS, taken=port))


def out_of_memory(client: redis.Redis) -> None:
    client.set("filler", b"x" * 2_000_000)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1mb")


def error_of(response: Any, status: int) -> str:
    assert response["Content-Type"].startswith("application/json"), response.content[:200]
    assert response.status_code == status, response.content
    return str(json.loads(response.content)["error"])


def test_the_errors_of_a_store_that_cannot_serve_are_the_ones_redis_py_raises(
    own_store: redis.Redis,
) -> None:
    read_only(own_store)
    with pytest.raises(redis.exceptions.ReadOnlyError):
        own_store.set("k", 1)
    own_store.replicaof("NO", "ONE")
    out_of_memory(own_store)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        own_store.set("k", 1)


@pytest.mark.parametrize("trouble", [read_only, out_of_memory])
def test_a_fail_closed_pool_answers_503_when_the_store_cannot_write(
    world: Any, reserve: Any, own_store: redis.Redis, trouble: Callable[[redis.Redis], None]
) -> None:
    held = reserve().json()["id"]
    trouble(own_store)

    assert error_of(reserve(), 503) == "unavailable"
    commit = world.client().post(
        f"/api/v1/reservations/{held}/commit",
        {"input_tokens": 1, "output_tokens": 1},
        format="json",
    )
    assert error_of(commit, 503) == "unavailable"


@pytest.mark.parametrize("trouble", [read_only, out_of_memory])
def test_a_fail_open_pool_admits_degraded_when_the_store_cannot_write(
    world: Any, reserve: Any, own_store: redis.Redis, trouble: Callable[[redis.Redis], None]
) -> None:
    world.pool.fail_mode = "open"
    world.pool.save()
    plans.clear()
    for space in quotas.reservations.get_engine().spaces:  # the save bumped it
        own_store.set(space.version, plans.get().version)
    trouble(own_store)

    admitted = reserve()

    assert admitted.status_code == 201, admitted.content
    assert admitted.json()["degraded"] is True


def test_a_script_holding_the_store_is_an_outage(reserve: Any, own_store: redis.Redis) -> None:
    own_store.config_set("busy-reply-threshold", 50)
    port = own_store.connection_pool.connection_kwargs["port"]
    runner = threading.Thread(target=_run_killed, args=(redis.Redis(port=port), SPIN))
    runner.start()
    try:
        wait_until(lambda: _busy(own_store), seconds=10, what="the script to hold the store")
        assert error_of(reserve(), 503) == "unavailable"
    finally:
        own_store.script_kill()
        runner.join(timeout=10)


def test_an_error_of_the_script_itself_stays_a_logged_500(
    world: Any, reserve: Any, own_store: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    version = quotas.reservations.get_engine().tenant_space(world.tenant.id).version
    own_store.delete(version)
    own_store.hset(version, "v", 1)  # WRONGTYPE for the script's GET

    assert error_of(reserve(), 500) == "internal_error"
    assert "WRONGTYPE" in caplog.text


def _run_killed(client: redis.Redis, script: str) -> None:
    with pytest.raises(redis.ResponseError, match="killed"):
        client.eval(script, 0)


def _busy(client: redis.Redis) -> bool:
    try:
        client.ping()
    except StoreBusyError:
        return True
    return False


@pytest.mark.single_redis  # a cluster of its own
@pytest.mark.slow
def test_a_script_holding_a_master_of_a_cluster_is_an_outage_of_its_shard_only(
    world: Any, reserve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = RedisCluster()
    cluster.start()
    try:
        engine = Engine(
            cluster_client(cluster.seeds.split(",")),
            hash_tag=settings.QUOTA_HASH_TAG,
            partitions=12,
        )
        for space in engine.spaces:
            engine.client.set(space.version, plans.get().version)
        monkeypatch.setattr(quotas.reservations, "get_engine", lambda: engine)
        assert reserve().status_code == 201
        home = engine.tenant_space(world.tenant.id)
        held = cluster.master_of(home.version)
        elsewhere = next(s for s in engine.spaces if cluster.master_of(s.version) != held)
        master = redis_client(f"redis://127.0.0.1:{held}")
        master.config_set("busy-reply-threshold", 50)
        runner = threading.Thread(target=_run_killed, args=(redis.Redis(port=held), SPIN))
        runner.start()
        try:
            wait_until(lambda: _busy(master), seconds=10, what="the script to hold the master")
            with pytest.raises(StoreBusyError):  # told apart by the app's cluster client
                engine.client.get(home.version)
            assert error_of(reserve(), 503) == "unavailable"
            assert engine.client.get(elsewhere.version)  # the other shards serve
        finally:
            master.script_kill()
            runner.join(timeout=10)
        assert reserve().status_code == 201
    finally:
        cluster.stop()
