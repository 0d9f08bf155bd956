"""Each plan reload freezes what the process holds (gc.freeze), so that later garbage
collections skip the plan and Django; nothing it freezes may leak."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import override_settings

from quotas.plan import load
from quotas.plan.load import PlanCache
from tests.fixtures import World


class Node:
    """A reference cycle that a weak reference can watch."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def freezing() -> Iterator[None]:
    with override_settings(QUOTA_PLAN_FREEZE=True):
        yield
    gc.unfreeze()  # the rest of the suite runs with nothing frozen


@pytest.fixture
def cache(freezing: None, monkeypatch: pytest.MonkeyPatch) -> PlanCache:
    """A cache in a process running one thread: the suite leaves threads of its own running
    (live servers, fake HTTP receivers), which the product would not freeze beside."""
    monkeypatch.setattr(load, "_one_thread", lambda: True)
    return PlanCache()


def _tracked(obj: Any) -> bool:
    """Whether `obj` is in one of the collector's three generations (not frozen)."""
    return any(o is obj for o in gc.get_objects())


def test_a_reload_freezes_the_plan_and_leaves_nothing_to_walk(
    world: World, cache: PlanCache
) -> None:
    plan = cache.get()

    assert gc.get_freeze_count() > 0
    assert gc.isenabled()
    assert not _tracked(plan.features) and not _tracked(plan.limits)
    assert not _tracked(world)  # what the process held at the time is frozen too


def test_the_plan_without_it_stays_in_the_generations(world: World) -> None:
    plan = PlanCache().get()  # the suite's setting: QUOTA_PLAN_FREEZE off

    assert gc.get_freeze_count() == 0
    assert _tracked(plan.features)


def test_a_replaced_plan_is_freed_though_it_was_frozen(world: World, cache: PlanCache) -> None:
    marker = Marker()
    watched = weakref.ref(marker)
    cache.get().tenants[-1] = marker  # type: ignore[assignment]  # only the plan keeps it
    del marker

    cache.reload(older_than=cache._plan)

    assert watched() is None  # the old plan went by reference counting, frozen as it was


class Marker:
    pass


def test_a_cycle_frozen_while_alive_is_collected_at_the_next_reload(
    world: World, cache: PlanCache
) -> None:
    cache.get()
    node = Node()
    watched = weakref.ref(node)
    cache.reload(older_than=cache._plan)  # `node` is alive (the request in flight): frozen
    del node
    gc.collect()
    assert watched() is not None  # frozen: no collection sees it

    cache.reload(older_than=cache._plan)

    assert watched() is None


def test_nothing_is_frozen_while_another_thread_runs(world: World, freezing: None) -> None:
    """Another thread's request in flight would be frozen with the plan (a gthread worker)."""
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        plan = PlanCache().get()
    finally:
        stop.set()
        other.join()

    assert gc.get_freeze_count() == 0
    assert _tracked(plan.features)


def test_a_failing_load_turns_the_collector_back_on(
    world: World, cache: PlanCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        assert not gc.isenabled()  # paused while the plan loads
        raise RuntimeError("database gone")

    monkeypatch.setattr(load, "plan_load", broken)

    with pytest.raises(RuntimeError):
        cache.get()
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0
