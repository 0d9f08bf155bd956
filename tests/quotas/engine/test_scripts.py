"""The engine's script calls on the client's own connections, against the real Redis: a
restart's losses (scripts, connections), a store that is down, threads and forked workers."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings

from quotas.engine import Engine, LeaseView, Owner, PoolOption, ReserveCall
from quotas.engine.scripts import SCRIPT_NAMES, script_source
from quotas.store import get_redis, redis_client
from tests.fixtures import DEAD_STORE


@pytest.fixture
def engine() -> Engine:
    return Engine(redis_client(settings.REDIS_URL), hash_tag=settings.QUOTA_HASH_TAG)


def held_count(engine: Engine) -> int:
    return engine.held().count


def reserved(engine: Engine, rid: str) -> str:
    """A reservation of no limits, for a caller to read back as its own."""
    call = ReserveCall(
        reservation_id=rid,
        version=0,
        tenant_id=7,
        feature_id=8,
        options=(PoolOption("main", ()),),
        input_tokens=1,
        max_output_tokens=1,
        min_output_tokens=1,
        cost_fixed=0,
        cost_per_output=0.0,
        prices=(0.0, 0.0, 0.0),
        ttl_ms=60_000,
    )
    engine.reserve(call)
    return rid


def read_back(engine: Engine, rid: str) -> str:
    """The id of the reservation the answer to a read of `rid` is about: `rid` itself unless
    answers were crossed between callers."""
    view = engine.peek(reservation_id=rid, owner=Owner(7), version=0)
    assert isinstance(view, LeaseView)
    return str(view.data["id"])


@pytest.fixture
def scripts_flushed() -> Iterator[None]:
    """Redis forgets every script (as after a restart); they are loaded again afterwards,
    since scripts are the whole server's and other tests count the commands they send."""
    get_redis().script_flush()
    yield
    for name in SCRIPT_NAMES:
        get_redis().script_load(script_source(name))


@pytest.mark.single_redis  # one server's script cache and connection; redis-py's own on a cluster
def test_a_script_redis_no_longer_holds_is_loaded_again(
    engine: Engine, scripts_flushed: None
) -> None:
    assert get_redis().script_exists(engine.scripts.sha("held")) == [False]

    assert held_count(engine) == 0
    assert get_redis().script_exists(engine.scripts.sha("held")) == [True]


@pytest.mark.single_redis
def test_a_connection_the_server_closed_is_replaced_before_use(engine: Engine) -> None:
    held_count(engine)
    first = int(engine.client.client_id())
    assert get_redis().client_kill_filter(_id=str(first)) == 1

    assert held_count(engine) == 0  # no ConnectionError: the closed socket is seen first
    assert int(engine.client.client_id()) != first


def test_a_store_that_is_down_raises_at_once() -> None:
    dead = Engine(redis_client(DEAD_STORE), hash_tag=settings.QUOTA_HASH_TAG)
    for _ in range(3):
        with pytest.raises(redis.ConnectionError):
            held_count(dead)


def test_concurrent_calls_each_get_their_own_answer(engine: Engine) -> None:
    threads, calls = 8, 40
    barrier = threading.Barrier(threads)
    failures: list[BaseException] = []

    def work(rid: str) -> None:
        barrier.wait()
        try:
            for _ in range(calls):
                assert read_back(engine, rid) == rid
        except BaseException as exc:  # reported below, with the thread's error
            failures.append(exc)

    rids = [reserved(engine, f"rsv_thread{n}") for n in range(threads)]
    pool = [threading.Thread(target=work, args=(rid,)) for rid in rids]
    for t in pool:
        t.start()
    for t in pool:
        t.join()

    assert failures == []


def test_a_forked_child_and_its_parent_both_get_their_answers(engine: Engine) -> None:
    parent, child = reserved(engine, "rsv_parent"), reserved(engine, "rsv_child")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether its own call was answered, then leave
        ok = b"0"
        try:
            ok = b"1" if read_back(engine, child) == child else b"0"
        finally:
            os.write(write, ok)
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert read_back(engine, parent) == parent  # the parent's connection still answers in order


class ClusterLike:
    """A client of another kind (as redis-py's RedisCluster): scripts are its own."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[Any]]] = []

    def register_script(self, source: str) -> Any:
        def script(*, keys: list[str], args: list[Any]) -> bytes:
            self.calls.append((keys, args))
            return b'{"count": 0, "complete": true, "leases": [], "now_ms": 1}'

        return script


def test_a_client_of_another_kind_is_called_its_own_way() -> None:
    client: Any = ClusterLike()
    engine = Engine(client, hash_tag=settings.QUOTA_HASH_TAG)

    assert held_count(engine) == 0
    assert client.calls and client.calls[0][0] == [engine.keys.leases]
