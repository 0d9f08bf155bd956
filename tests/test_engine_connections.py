"""The engine's own connections for its script calls (quotas.engine.scripts): what the client's
pool would guarantee still holds, against the real Redis."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings

from quotas.engine import Engine
from quotas.engine.scripts import SCRIPT_NAMES, Connections, script_source
from quotas.store import get_redis, redis_client
from tests.fixtures import DEAD_STORE


@pytest.fixture
def engine() -> Engine:
    return Engine(redis_client(settings.REDIS_URL), hash_tag=settings.QUOTA_HASH_TAG)


def held_count(engine: Engine) -> int:
    return engine.held().count


@pytest.fixture
def scripts_flushed() -> Iterator[None]:
    """Redis forgets every script (as after a restart); they are loaded again afterwards,
    since scripts are the whole server's and other tests count the commands they send."""
    get_redis().script_flush()
    yield
    for name in SCRIPT_NAMES:
        get_redis().script_load(script_source(name))


def test_a_script_redis_no_longer_holds_is_loaded_again(
    engine: Engine, scripts_flushed: None
) -> None:
    assert get_redis().script_exists(engine.scripts._scripts["held"].sha) == [False]

    assert held_count(engine) == 0
    assert get_redis().script_exists(engine.scripts._scripts["held"].sha) == [True]


def client_id(connection: Any) -> int:
    connection.send_command("CLIENT", "ID")
    return int(connection.read_response())


def test_a_connection_the_server_closed_is_replaced_before_use(engine: Engine) -> None:
    held_count(engine)
    (kept,) = engine.scripts._connections._idle
    first = client_id(kept)
    assert get_redis().client_kill_filter(_id=str(first)) == 1

    assert held_count(engine) == 0  # no ConnectionError: the closed socket is seen first
    assert engine.scripts._connections._idle == [kept]
    assert client_id(kept) != first


def test_a_scripts_error_leaves_its_connection_usable(engine: Engine) -> None:
    held_count(engine)
    (kept,) = engine.scripts._connections._idle
    socket_before = kept._sock

    with pytest.raises(redis.ResponseError):
        engine.scripts.call("held", [engine.keys.leases], b"not json")

    assert kept._sock is socket_before
    assert held_count(engine) == 0


def test_a_store_that_is_down_raises_at_once_and_is_used_again_once_back() -> None:
    dead = Engine(redis_client(DEAD_STORE), hash_tag=settings.QUOTA_HASH_TAG)
    for _ in range(3):
        with pytest.raises(redis.ConnectionError):
            held_count(dead)
    assert len(dead.scripts._connections._idle) == 1  # kept, not one more per failed call


def test_concurrent_calls_each_have_a_connection_of_their_own(engine: Engine) -> None:
    threads, calls = 8, 40
    barrier = threading.Barrier(threads)
    failures: list[BaseException] = []

    def work() -> None:
        barrier.wait()
        try:
            for _ in range(calls):
                assert held_count(engine) == 0
        except BaseException as exc:  # reported below, with the thread's error
            failures.append(exc)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()

    assert failures == []
    kept = engine.scripts._connections._idle
    assert 1 <= len(kept) <= threads
    assert len({id(c) for c in kept}) == len(kept)


def test_a_forked_child_opens_its_own_connection(engine: Engine) -> None:
    held_count(engine)
    (parents,) = engine.scripts._connections._idle
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether its connection is the parent's, then leave
        ok = b"0"
        try:
            child = engine.scripts._connections.take()
            ok = b"1" if child is not parents and held_count(engine) == 0 else b"0"
        finally:
            os.write(write, ok)
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert held_count(engine) == 0  # the parent's connection still answers in order
    assert engine.scripts._connections._idle == [parents]


def test_connections_are_made_by_the_clients_pool_with_its_settings() -> None:
    client = redis_client(settings.REDIS_URL)
    connections = Connections(client.connection_pool)
    taken: Any = connections.take()
    try:
        assert taken.socket_timeout == 2.0
        assert taken.health_check_interval == 30
        assert taken.db == client.connection_pool.connection_kwargs["db"]
    finally:
        connections.give(taken)


def test_engines_on_one_client_take_nothing_from_its_pools_limit() -> None:
    client = get_redis()
    for _ in range(client.connection_pool.max_connections + 20):
        engine = Engine(client, hash_tag=settings.QUOTA_HASH_TAG)
        assert held_count(engine) == 0
    assert client.ping()


def test_no_more_connections_than_the_pools_limit() -> None:
    client = redis.Redis.from_url(settings.REDIS_URL, max_connections=2)
    connections = Connections(client.connection_pool)
    first, second = connections.take(), connections.take()
    with pytest.raises(redis.exceptions.MaxConnectionsError):
        connections.take()
    connections.give(first)
    assert connections.take() is first  # given back, it serves the next call
    connections.give(first)
    connections.give(second)


class ClusterLike:
    """A client without a plain connection pool (as redis-py's RedisCluster): scripts are
    called its own way."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[Any]]] = []

    def register_script(self, source: str) -> Any:
        def script(*, keys: list[str], args: list[Any]) -> bytes:
            self.calls.append((keys, args))
            return b'{"count": 0, "complete": true, "leases": [], "now_ms": 1}'

        return script


def test_a_client_without_a_plain_pool_is_called_its_own_way() -> None:
    client: Any = ClusterLike()
    engine = Engine(client, hash_tag=settings.QUOTA_HASH_TAG)

    assert held_count(engine) == 0
    assert client.calls and client.calls[0][0] == [engine.keys.leases]
