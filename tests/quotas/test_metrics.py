"""The engine's metrics move as traffic flows through the API: decisions by outcome and
reason, script latency, Redis errors, degraded grants and plan reloads."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from prometheus_client import REGISTRY

import quotas.degraded
import quotas.reservations
from quotas.engine import Engine
from quotas.plan import plans
from quotas.store import redis_client
from tests.fixtures import DEAD_STORE, World
from tests.metrics import Moves, sample

DECISIONS = "quota_reservations_total"


def decision(outcome: str, reason: str = "", feature: str = "chat", pool: str = "shared") -> Any:
    labels = {"outcome": outcome, "reason": reason, "tenant": "acme", "feature": feature}
    return (DECISIONS, {**labels, "pool": pool})


def test_grants_and_refusals_are_counted_by_tenant_feature_pool_and_reason(
    world: World, reserve: Any
) -> None:
    world.limit(feature=world.chat, metric="requests", amount=2)
    moves = Moves(decision("granted"), decision("refused", "rate_limited"))

    statuses = [reserve().status_code for _ in range(3)]

    assert statuses == [201, 201, 429]
    assert moves.moved() == [2, 1]


def test_a_paused_feature_is_a_decision_and_an_unknown_one_is_not(
    world: World, reserve: Any
) -> None:
    world.batch.status = "paused"
    world.batch.save()
    plans.clear()
    moves = Moves(decision("paused", feature="batch", pool=""))

    assert reserve(feature="batch").status_code == 423
    assert reserve(feature="no-such-feature").status_code == 404

    assert moves.moved() == [1]
    assert not any(
        s.labels.get("feature") == "no-such-feature"
        for metric in REGISTRY.collect()
        for s in metric.samples
    )  # a label never takes what the caller sent


def test_each_script_call_is_timed(world: World, reserve: Any) -> None:
    moves = Moves(
        ("quota_script_duration_seconds_count", {"script": "reserve"}),
        ("quota_script_duration_seconds_count", {"script": "commit"}),
    )
    held = reserve().json()["id"]
    committed = world.client().post(
        f"/api/v1/reservations/{held}/commit",
        {"input_tokens": 10, "output_tokens": 10},
        format="json",
    )
    assert committed.status_code == 200
    assert moves.moved() == [1, 1]
    assert sample("quota_script_duration_seconds_sum", script="reserve") > 0


@pytest.fixture
def store_down(monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    quotas.degraded._spool.clear()
    dead = Engine(redis_client(DEAD_STORE), hash_tag=settings.QUOTA_HASH_TAG)
    monkeypatch.setattr(quotas.reservations, "get_engine", lambda: dead)
    yield dead
    quotas.degraded._spool.clear()


def test_a_store_that_is_down_counts_redis_errors_and_unavailable_decisions(
    world: World, reserve: Any, store_down: Engine
) -> None:
    moves = Moves(
        ("quota_redis_errors_total", {"script": "reserve", "error": "ConnectionError"}),
        decision("unavailable", "store_down"),
    )
    assert reserve().status_code == 503
    assert moves.moved() == [1, 1]


def test_an_open_pool_counts_its_degraded_grants(
    world: World, reserve: Any, store_down: Engine
) -> None:
    world.pool.fail_mode = "open"
    world.pool.save()
    plans.clear()
    moves = Moves(
        ("quota_degraded_grants_total", {"reason": "store_down", "tenant": "acme",
                                         "feature": "chat", "pool": "shared"}),
        decision("degraded", "store_down"),
        decision("granted"),
    )  # fmt: skip

    response = reserve()

    assert response.status_code == 201 and "Quota-Degraded" in response
    assert moves.moved() == [1, 1, 0]


def test_plan_loads_are_counted(world: World, reserve: Any) -> None:
    moves = Moves(("quota_plan_reloads_total", {"outcome": "loaded"}))
    plans.clear()
    assert reserve().status_code == 201
    assert reserve().status_code == 201  # the plan in hand serves the second
    assert moves.moved() == [1]
