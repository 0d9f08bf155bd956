"""The quota app's Celery tasks, on the store the tests run on: one Redis (one partition,
nothing to rebalance) or the cluster pass's cluster (12 partitions)."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from config.celery import app
from quotas import tasks
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
