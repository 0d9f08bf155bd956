"""Rollups per minute, hour and day from the ledger, and retention."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.test import override_settings

from ledger.models import Refusal, UsageEvent, UsageRollup
from ledger.rollups import DAY_MS, ledger_prune, rollups_update
from ledger.services import usage_ingest
from quotas.reservations import get_engine, leases_expire
from tests.fixtures import World

pytestmark = pytest.mark.django_db

MINUTE_MS = 60_000


@pytest.fixture(autouse=True)
def minute_start_clock() -> None:
    engine = get_engine()
    now = engine.now_ms()
    engine.frozen_ms = now - now % 3_600_000 + 10 * MINUTE_MS  # minute 10 of this hour


def commit(world: World, rid: str, **usage: Any) -> Any:
    return world.client().post(f"/api/v1/reservations/{rid}/commit", usage, format="json")


def traffic(world: World, reserve: Any) -> None:
    world.limit(tenant=world.tenant, feature=world.batch, metric="requests", amount=2)
    for n, (finish, status) in enumerate([("stop", 200), ("length", 200), ("stop", 429)]):
        rid = reserve(input_tokens=100, max_output_tokens=50, metadata={"wait_ms": 100 * (n + 1)})
        body = {"input_tokens": 100, "cached_input_tokens": 10, "output_tokens": 20 + n}
        commit(world, rid.json()["id"], finish_reason=finish, upstream_status=status, **body)
    released = reserve().json()["id"]
    world.client().post(f"/api/v1/reservations/{released}/release")
    for _ in range(2):
        reserve(feature="batch", ttl_seconds=1)
    assert reserve(feature="batch").status_code == 429
    get_engine().frozen_ms += 2_000
    leases_expire()


def rollup(grain: str, **dims: str) -> UsageRollup:
    return UsageRollup.objects.get(grain=grain, **dims)


def test_minute_hour_and_day_rollups_count_usage_refusals_and_trouble(
    world: World, reserve: Any
) -> None:
    traffic(world, reserve)
    usage_ingest()
    assert rollups_update() == 1

    chat = rollup("minute", feature="chat")
    assert (chat.requests, chat.input_tokens, chat.cached_input_tokens) == (3, 300, 30)
    assert (chat.output_tokens, chat.truncated, chat.upstream_429, chat.released) == (63, 1, 1, 1)
    assert chat.cost_nusd == sum(
        UsageEvent.objects.values_list("cost_nusd", flat=True).exclude(cost_nusd=None)
    )
    assert (chat.wait_p50_ms, chat.wait_p95_ms) == pytest.approx((200, 300), rel=0.1)
    batch = rollup("minute", feature="batch", pool="shared")
    assert (batch.requests, batch.expired) == (0, 2)
    refused = rollup("minute", feature="batch", pool="")
    assert (refused.refused_rate_limited, refused.refused_budget_exhausted) == (1, 0)
    for grain in ("hour", "day"):
        merged = rollup(grain, feature="chat")
        assert (merged.requests, merged.output_tokens, merged.wait_p95_ms) == (
            3,
            63,
            chat.wait_p95_ms,
        )
        assert rollup(grain, feature="batch", pool="").refused_rate_limited == 1


def test_a_second_run_changes_nothing_and_a_late_commit_moves_its_minute(
    world: World, reserve: Any
) -> None:
    engine = get_engine()
    rid = reserve(ttl_seconds=1).json()["id"]
    engine.frozen_ms += 2_000
    leases_expire()
    usage_ingest()
    rollups_update()
    rows = list(UsageRollup.objects.values_list("grain", "expired", "requests"))
    assert sorted(rows) == [("day", 1, 0), ("hour", 1, 0), ("minute", 1, 0)]
    assert rollups_update() == 1
    assert sorted(UsageRollup.objects.values_list("grain", "expired", "requests")) == sorted(rows)

    engine.frozen_ms += 3 * MINUTE_MS
    commit(world, rid, input_tokens=10, output_tokens=1)  # a commit after expiry
    usage_ingest()
    rollups_update()

    minutes = UsageRollup.objects.filter(grain="minute").values_list("expired", "requests")
    assert sorted(minutes) == [(0, 1)]  # still the minute it was made in, now committed
    assert (
        rollup("day", feature="chat").requests == 1 and rollup("day", feature="chat").expired == 0
    )


@override_settings(
    LEDGER_RAW_RETENTION_DAYS=40, LEDGER_REFUSAL_RETENTION_DAYS=2, LEDGER_MINUTE_RETENTION_DAYS=1
)
def test_retention_deletes_what_is_older_than_each_setting(world: World, reserve: Any) -> None:
    traffic(world, reserve)
    usage_ingest()
    rollups_update()
    now = int(time.time() * 1000)

    assert ledger_prune(now_ms=now + 3 * DAY_MS) == {
        "usage": 0,
        "refusals": 1,
        "minute": 3,
        "hour": 0,
        "day": 0,
    }
    assert Refusal.objects.count() == 0 and UsageEvent.objects.count() == 6
    assert ledger_prune(now_ms=now + 41 * DAY_MS)["usage"] == 6
