"""Drift between Redis budget counters and the ledger: exact (no false alarm for events still
in the stream), found when injected, and repaired by a delta that keeps concurrent changes."""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command

from ledger.models import UsageEvent
from ledger.reconcile import budgets_reconcile
from ledger.services import entries_batch_write, usage_ingest
from quotas.engine import Engine
from quotas.engine.stream import UsageStream
from quotas.models import Limit
from quotas.plan import plans
from quotas.reservations import get_engine
from tests.fixtures import World
from tests.ledger.partitions import (
    shared_limit,
    space_of,
    stream_of,
    tenant_elsewhere,
    three_partitions,
)

pytestmark = pytest.mark.django_db
__all__ = ["three_partitions"]  # a fixture


def commit(world: World, rid: str, **usage: Any) -> Any:
    return world.client().post(f"/api/v1/reservations/{rid}/commit", usage, format="json")


def budgets(world: World) -> tuple[Limit, Limit]:
    day = world.limit(tenant=world.tenant, metric="tokens", window="day", amount=100_000)
    month = world.limit(pool=world.pool, metric="cost_usd", window="month", amount=5)
    return day, month


def some_traffic(world: World, reserve: Any, n: int = 4) -> None:
    for i in range(n):
        rid = reserve(input_tokens=500, max_output_tokens=300).json()["id"]
        if i % 2 == 0:
            commit(world, rid, input_tokens=450, output_tokens=20 + i)


def test_no_drift_when_every_event_is_in_the_ledger(world: World, reserve: Any) -> None:
    budgets(world)
    some_traffic(world, reserve)
    usage_ingest()

    report = budgets_reconcile()

    # the day budget on the tenant's partition; the pool's month budget there too, and on a
    # partitioned store on every other partition as well (split), where nothing was used
    assert len(report.rows) == 1 + len(get_engine().spaces) and report.drifted == []
    here = [row for row in report.rows if row.period.key.startswith(space_of(world).prefix)]
    assert len(here) == 2 and all(row.redis > 0 for row in here)
    assert all(row.redis == 0 for row in report.rows if row not in here)


def test_events_not_yet_ingested_or_not_yet_acknowledged_are_no_drift(
    world: World, reserve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    budgets(world)
    some_traffic(world, reserve)
    stream = stream_of(world)
    stream.ensure_group()
    monkeypatch.setattr(UsageStream, "ack", lambda self, ids: 0)  # committed, never acked
    entries_batch_write(stream=stream, entries=stream.read("w1", count=3))
    monkeypatch.undo()
    some_traffic(world, reserve, n=2)  # still in the stream, not read by anyone

    assert budgets_reconcile().drifted == []


def test_injected_drift_is_reported_and_repaired(world: World, reserve: Any) -> None:
    day, month = budgets(world)
    some_traffic(world, reserve)
    usage_ingest()
    right = {row.period.key: row.redis for row in budgets_reconcile().rows}
    client, prefix = get_engine().client, space_of(world).prefix
    day_key = next(k for k in right if k.startswith(f"{prefix}p:{day.id}:"))
    month_key = next(k for k in right if k.startswith(f"{prefix}p:{month.id}:"))
    client.incrby(day_key, 777)  # a lost refund
    client.delete(month_key)  # a lost key

    report = budgets_reconcile()
    found = {row.period.key: row.drift for row in report.drifted}
    assert found == {day_key: 777, month_key: -right[month_key]}

    out = StringIO()
    call_command("quota", "drift", "--repair", stdout=out)
    assert "2 drifted; 2 repaired" in out.getvalue()
    assert budgets_reconcile().drifted == []
    assert int(client.get(day_key)) == right[day_key]
    assert int(client.get(month_key)) == right[month_key]


def test_the_drift_command_lists_only_drifted_budgets(world: World, reserve: Any) -> None:
    day, _ = budgets(world)
    some_traffic(world, reserve, n=2)
    usage_ingest()
    plan, engine = plans.get(), get_engine()
    check = plan.inspection_check(plan.limits[day.id], space_of(world), engine.now_ms_estimate())
    engine.client.incrby(check.periods[1].key, -5)

    out = StringIO()
    call_command("quota", "drift", stdout=out)

    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["LIMIT", "KEY", "REDIS", "LEDGER", "DRIFT"]
    assert len(lines) == 3 and lines[1].endswith("-5")
    assert lines[2] == f"{1 + len(engine.spaces)} budgets checked, 1 drifted."


def test_a_split_budgets_counter_on_each_partition_is_compared_with_its_own_tenants_usage(
    three_partitions: Engine, world: World, reserve: Any
) -> None:
    """A pool's month budget shared by two tenants on two partitions: each partition's counter
    holds its own tenant's usage, and no drift is reported; drift injected on one partition's
    counter is found there alone and repaired to that partition's tenant's usage."""
    engine = three_partitions
    other, other_client = tenant_elsewhere(world, "globex")
    ours, theirs = space_of(world), engine.tenant_space(other.id)
    shared_limit(pool=world.pool, metric="tokens", window="month", amount=300_000)
    plans.clear()
    some_traffic(world, reserve, n=4)
    for _ in range(3):  # the other tenant's: more of them, so the counters differ
        rid = reserve(client=other_client, input_tokens=900).json()["id"]
        body = {"input_tokens": 900, "output_tokens": 7}
        assert (
            other_client.post(f"/api/v1/reservations/{rid}/commit", body, format="json").status_code
            == 200
        )
    usage_ingest()

    report = budgets_reconcile()

    assert report.drifted == []
    counters = {row.period.key: row.redis for row in report.rows}
    assert len(counters) == 3  # one on each partition
    key = {
        space.index: next(k for k in counters if k.startswith(space.prefix))
        for space in engine.spaces
    }
    mine = sum(
        (row.input_tokens or row.reserved_input_tokens)
        + (row.output_tokens if row.state == "committed" else row.reserved_output_tokens)
        for row in UsageEvent.objects.filter(tenant="acme")
    )
    assert counters[key[ours.index]] == mine > 0
    assert counters[key[theirs.index]] == 3 * 907
    third = next(space for space in engine.spaces if space not in (ours, theirs))
    assert counters[key[third.index]] == 0

    engine.client.incrby(key[theirs.index], -500)  # a refund counted twice, there
    report = budgets_reconcile(repair=True)
    assert {row.period.key: row.drift for row in report.drifted} == {key[theirs.index]: -500}
    assert report.repaired == 1
    assert int(engine.client.get(key[theirs.index])) == 3 * 907
    assert int(engine.client.get(key[ours.index])) == mine
    assert budgets_reconcile().drifted == []
