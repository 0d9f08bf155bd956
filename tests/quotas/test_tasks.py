"""The quota app's Celery tasks, on the store the tests run on: one Redis (one partition,
nothing to rebalance) or the cluster pass's cluster (12 partitions)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis
from django.conf import settings

from config.celery import app
from quotas import tasks
from quotas.engine import Engine
from quotas.engine.core import KeySpace
from quotas.reservations import leases_expire
from quotas.store import get_engine
from tests.fixtures import World


def test_beat_rebalances_allotments_every_configured_period() -> None:
    app.loader.import_default_modules()
    entry = app.conf.beat_schedule["rebalance-allotments"]
    assert entry["task"] in app.tasks
    assert entry["schedule"] == settings.QUOTA_REBALANCE_SECONDS


def test_the_rebalance_task_moves_a_pool_limit_toward_its_tenant(
    world: World, reserve: Any
) -> None:
    limit = world.limit(pool=world.pool, metric="tokens", amount=120_000)
    for _ in range(5):
        assert reserve(input_tokens=1_000).status_code == 201
    engine = get_engine()
    moved = tasks.rebalance_allotments.delay().get()
    if not engine.partitioned:
        assert moved == 0
        return
    # the only tenant asking gets nearly all of it; the allotments add up to the amount
    units = []
    for space in engine.spaces:
        raw = engine.client.hget(space.allot, str(limit.id))
        units.append(int(raw.split(b":")[0]) if raw else 0)
    assert sum(units) == 120_000
    home = engine.tenant_space(world.tenant.pk).index
    assert units[home] > 110_000, units
    assert moved > 0


@pytest.fixture
def partitions(monkeypatch: pytest.MonkeyPatch) -> Engine:
    """The store split into three partitions at least (as QUOTA_PARTITIONS=3 makes it)."""
    engine = get_engine()
    if len(engine.spaces) < 3:
        spaces = Engine(engine.client, hash_tag=settings.QUOTA_HASH_TAG, partitions=3).spaces
        monkeypatch.setattr(engine, "spaces", spaces)
        monkeypatch.setattr(engine, "keys", spaces[0])
    return engine


def test_the_reaper_expires_leases_of_the_partitions_that_answer_while_others_fail_over(
    partitions: Engine,
    world: World,
    reserve: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = partitions
    home = engine.tenant_space(world.tenant.id).index
    engine.frozen_ms = engine.now_ms()
    assert reserve(ttl_seconds=1).status_code == 201
    engine.frozen_ms += 2_000
    reap = engine.reap

    def reap_or_fail(*, batch: int, space: KeySpace) -> int:
        if space.index != home:
            raise redis.exceptions.SlotNotCoveredError(f"no master for {space.index}")
        return reap(batch=batch, space=space)

    monkeypatch.setattr(engine, "reap", reap_or_fail)
    with caplog.at_level(logging.WARNING):
        assert tasks.expire_leases.delay().get() == 1

    failing = [r for r in caplog.records if "not expired" in r.getMessage()]
    assert len(failing) == len(engine.spaces) - 1


def test_the_reaper_fails_when_no_partition_answers(
    partitions: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(*, batch: int, space: KeySpace) -> int:
        raise redis.ConnectionError("refused")

    monkeypatch.setattr(partitions, "reap", down)
    with pytest.raises(redis.ConnectionError):
        leases_expire()
