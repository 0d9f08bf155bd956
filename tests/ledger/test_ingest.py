"""Ingest of the usage stream into the ledger: one merged row per reservation, exactly once."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis
from django.test import override_settings

import quotas.degraded
import quotas.reservations
from ledger.models import DeadLetter, LedgerState, PoolEvent, Refusal, UsageEvent
from ledger.services import (
    LedgerStream,
    consumer_name,
    degraded_leases_expire,
    entries_batch_write,
    usage_ingest,
    usage_stream,
    usage_stream_trim,
    usage_streams,
)
from quotas.engine import Engine
from quotas.plan import plans
from quotas.reservations import get_engine, leases_expire
from quotas.store import redis_client
from tests.fixtures import DEAD_STORE, World
from tests.ledger.partitions import stream_of, tenant_elsewhere, three_partitions

pytestmark = pytest.mark.django_db
__all__ = ["three_partitions"]  # a fixture


def commit(world: World, rid: str, **usage: Any) -> Any:
    usage.setdefault("input_tokens", 80)
    usage.setdefault("output_tokens", 40)
    return world.client().post(f"/api/v1/reservations/{rid}/commit", usage, format="json")


def all_entries(world: World) -> list[tuple[str, dict[str, str]]]:
    stream = stream_of(world)
    return list(stream.client.xrange(stream.key))


def test_a_committed_reservation_becomes_one_row_with_its_actual_usage(
    world: World, reserve: Any
) -> None:
    rid = reserve(input_tokens=100, max_output_tokens=50).json()["id"]
    assert commit(world, rid, cached_input_tokens=30, finish_reason="length").status_code == 200

    report = usage_ingest()

    assert report.entries == 2
    row = UsageEvent.objects.get(rid=rid)
    assert row.state == "committed"
    assert (row.tenant, row.feature, row.pool, row.model) == (
        "acme",
        "chat",
        "shared",
        "gpt-4o-mini",
    )
    assert (row.tenant_pk, row.feature_pk, row.pool_pk) == (
        world.tenant.id,
        world.chat.id,
        world.pool.id,
    )
    assert (row.reserved_input_tokens, row.reserved_output_tokens) == (100, 50)
    assert (row.input_tokens, row.cached_input_tokens, row.output_tokens) == (80, 30, 40)
    assert row.cost_nusd == 50 * 150 + 30 * 75 + 40 * 600  # $0.15, 0.075, 0.60 per Mtok
    assert row.finish_reason == "length"
    assert row.created_ms is not None and row.finished_ms is not None
    assert stream_of(world).backlog() == 0


def test_a_scheduled_reservation_records_its_promised_and_actual_wait(
    world: World, reserve: Any
) -> None:
    # the tenant's own limit: on a partitioned store a pool's is split into allotments
    world.limit(tenant=world.tenant, metric="tokens", amount=60_000)
    engine = get_engine()
    engine.frozen_ms = engine.now_ms()
    reserve(input_tokens=59_900, max_output_tokens=100)
    body = reserve(input_tokens=1_900, max_output_tokens=100, max_wait_ms=10_000).json()
    assert body["status"] == "scheduled" and body["wait_ms"] == 2_000
    engine.frozen_ms += 2_500  # the call went 2.5 s after the reservation and took 300 ms
    engine.frozen_ms += 300
    assert commit(world, body["id"], latency_ms=300).status_code == 200

    usage_ingest()

    row = UsageEvent.objects.get(rid=body["id"])
    assert (row.promised_wait_ms, row.actual_wait_ms) == (2_000, 2_500)


def test_a_batch_read_twice_makes_no_second_row(world: World, reserve: Any) -> None:
    rids = [reserve().json()["id"] for _ in range(3)]
    commit(world, rids[0])
    entries = all_entries(world)

    entries_batch_write(stream=stream_of(world), entries=entries)
    entries_batch_write(stream=stream_of(world), entries=entries)

    assert UsageEvent.objects.count() == 3
    assert UsageEvent.objects.get(rid=rids[0]).state == "committed"
    assert set(UsageEvent.objects.exclude(rid=rids[0]).values_list("state", flat=True)) == {"held"}


def _late_commit(world: World, reserve: Any) -> str:
    engine = get_engine()
    engine.frozen_ms = engine.now_ms()
    rid = reserve(ttl_seconds=1).json()["id"]
    engine.frozen_ms += 5_000
    assert leases_expire() == 1
    response = commit(world, rid, output_tokens=7)
    assert response.json()["lease_expired"] is True
    return str(rid)


@pytest.mark.parametrize("order", ["stream", "reversed"])
def test_a_commit_after_expiry_ends_committed_whatever_the_order(
    world: World, reserve: Any, order: str
) -> None:
    rid = _late_commit(world, reserve)
    entries = all_entries(world)
    assert [f["type"] for _, f in entries] == ["reserved", "expired", "committed"]
    if order == "reversed":
        entries.reverse()

    for entry in entries:  # one batch each: the merge happens in the database
        entries_batch_write(stream=stream_of(world), entries=[entry])

    row = UsageEvent.objects.get(rid=rid)
    assert (row.state, row.output_tokens, row.lease_expired) == ("committed", 7, True)
    assert row.reserved_output_tokens == 100 and row.tenant == "acme"


def extend(world: World, rid: str, ttl_seconds: int) -> Any:
    return world.client().post(
        f"/api/v1/reservations/{rid}/extend", {"ttl_seconds": ttl_seconds}, format="json"
    )


@pytest.mark.parametrize("order", ["stream", "reversed", "one batch"])
def test_the_ledger_keeps_the_expiry_the_latest_extension_granted(
    world: World, reserve: Any, order: str
) -> None:
    engine = get_engine()
    engine.frozen_ms = start = engine.now_ms()
    rid = reserve(ttl_seconds=60).json()["id"]
    engine.frozen_ms += 10_000
    assert extend(world, rid, 900).status_code == 200
    engine.frozen_ms += 10_000
    assert extend(world, rid, 300).status_code == 200  # shortens it again
    entries = all_entries(world)
    assert [f["type"] for _, f in entries] == ["reserved", "extended", "extended"]
    assert entries[1][1]["expires_ms"] == str(start + 10_000 + 900_000)
    assert entries[1][1]["feature"] == "chat"

    if order == "one batch":
        entries_batch_write(stream=stream_of(world), entries=entries)
    else:
        for entry in entries if order == "stream" else entries[::-1]:
            entries_batch_write(stream=stream_of(world), entries=[entry])

    row = UsageEvent.objects.get(rid=rid)
    # the expiry granted last, whatever the order: the later extension shortened the lease
    assert (row.expires_ms, row.expiry_granted_ms) == (start + 20_000 + 300_000, start + 20_000)
    assert (row.state, row.reserved_output_tokens, row.tenant) == ("held", 100, "acme")


def test_an_expired_reservation_is_recorded_as_expired(world: World, reserve: Any) -> None:
    engine = get_engine()
    engine.frozen_ms = engine.now_ms()
    rid = reserve(ttl_seconds=1).json()["id"]
    engine.frozen_ms += 5_000
    leases_expire()

    usage_ingest()

    row = UsageEvent.objects.get(rid=rid)
    assert (row.state, row.input_tokens, row.finished_ms) == ("expired", None, engine.frozen_ms)


def test_refusals_are_counted_once_each(world: World, reserve: Any) -> None:
    limit = world.limit(tenant=world.tenant, metric="requests", amount=1)
    reserve()
    assert reserve().status_code == 429
    assert reserve().status_code == 429
    entries = all_entries(world)

    entries_batch_write(stream=stream_of(world), entries=entries)
    entries_batch_write(stream=stream_of(world), entries=entries)

    refusals = list(Refusal.objects.values_list("reason", "limit_id", "feature"))
    assert refusals == [("rate_limited", limit.id, "chat")] * 2


@override_settings(LEDGER_CLAIM_IDLE_MS=0)
def test_entries_a_dead_consumer_held_are_reclaimed(world: World, reserve: Any) -> None:
    rids = [reserve().json()["id"] for _ in range(4)]
    stream = stream_of(world)
    stream.ensure_group()
    assert len(stream.read("dead-worker", count=3)) == 3  # read, never acknowledged

    report = usage_ingest()

    assert report.reclaimed == 3 and report.entries == 4
    assert set(UsageEvent.objects.values_list("rid", flat=True)) == set(rids)
    assert stream.pending() == 0
    assert LedgerState.objects.get().ingested_total == 4


def test_what_this_process_read_and_never_acknowledged_is_finished_at_once(
    world: World, reserve: Any
) -> None:
    """An ingest of this process that failed mid-batch (Redis went away after the read) left
    its entries pending under this process's own consumer: the next ingest writes them first,
    without waiting the claim idle time meant for dead consumers (30 s by default)."""
    rids = [reserve().json()["id"] for _ in range(4)]
    stream = stream_of(world)
    stream.ensure_group()
    assert len(stream.read(consumer_name(), count=3)) == 3  # read, then the task failed

    report = usage_ingest()

    assert report.reclaimed == 3 and report.entries == 4
    assert set(UsageEvent.objects.values_list("rid", flat=True)) == set(rids)
    assert stream.pending() == 0


def test_the_stream_is_trimmed_only_below_what_every_group_acknowledged(
    world: World, reserve: Any
) -> None:
    for _ in range(3):
        reserve()
    stream = stream_of(world)
    stream.ensure_group()
    stream.client.xgroup_create(stream.key, "audit", id="0")
    # another group read one entry and has not acknowledged it
    first = stream.client.xreadgroup("audit", "a1", {stream.key: ">"}, count=1)[0][1][0][0]

    usage_ingest()
    assert usage_stream_trim() == 0  # the audit group still needs everything
    assert stream.client.xlen(stream.key) == 3

    second = stream.client.xreadgroup("audit", "a1", {stream.key: ">"}, count=1)[0][1][0][0]
    stream.client.xack(stream.key, "audit", first, second)
    assert usage_stream_trim() == 2
    assert stream.client.xlen(stream.key) == 1

    reserve()
    assert usage_stream_trim() == 0  # the new entry is not acknowledged by anyone yet


def test_ingest_records_when_each_api_key_was_last_used_without_a_config_change(
    world: World, reserve: Any
) -> None:
    from datetime import UTC, datetime

    from quotas.models import ApiKey
    from quotas.store import config_version_read

    engine = get_engine()
    engine.frozen_ms = 1_900_000_000_000
    rid = reserve().json()["id"]
    engine.frozen_ms += 5_000
    commit(world, rid)
    version = config_version_read()
    records = ApiKey.history.count()

    usage_ingest()

    key = ApiKey.objects.get(tenant=world.tenant)
    assert key.last_used_at == datetime.fromtimestamp(1_900_000_005, tz=UTC)  # the commit
    assert config_version_read() == version  # no plan reload anywhere
    assert ApiKey.history.count() == records  # not a change of configuration

    engine.frozen_ms -= 60_000  # an older event read later does not move it back
    reserve()
    usage_ingest()
    key.refresh_from_db()
    assert key.last_used_at == datetime.fromtimestamp(1_900_000_005, tz=UTC)


def test_a_degraded_reservation_never_committed_expires_in_the_ledger_after_its_ttl(
    world: World, reserve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.pool.fail_mode = "open"
    world.pool.save()
    plans.clear()
    quotas.degraded._spool.clear()
    dead = Engine(redis_client(DEAD_STORE), hash_tag="quota")
    monkeypatch.setattr(quotas.reservations, "get_engine", lambda: dead)
    held = reserve(ttl_seconds=60).json()
    committed = reserve(ttl_seconds=60).json()
    assert held["degraded"] is True
    assert commit(world, committed["id"]).status_code == 200
    monkeypatch.undo()  # the store is back: the next reservation flushes the spool
    reserve()
    usage_ingest()
    row = UsageEvent.objects.get(rid=held["id"])
    assert (row.state, row.degraded) == ("held", True) and row.expires_ms is not None

    assert degraded_leases_expire(now_ms=row.expires_ms - 1) == 0  # not yet
    assert degraded_leases_expire(now_ms=row.expires_ms + 1) == 1

    row.refresh_from_db()
    assert (row.state, row.finished_ms, row.reserved_output_tokens) == (
        "expired",
        row.expires_ms,
        100,
    )
    assert UsageEvent.objects.get(rid=committed["id"]).state == "committed"
    assert UsageEvent.objects.filter(state="held").count() == 1  # the store's own lease
    assert commit(world, held["id"]).status_code == 200  # a late commit still counts
    usage_ingest()
    assert UsageEvent.objects.get(rid=held["id"]).state == "committed"


def test_a_pools_adaptation_and_breaker_events_become_pool_events_once(
    world: World, reserve: Any
) -> None:
    world.pool.backpressure = {"adaptive": True, "breaker_min_calls": 1}
    world.pool.save()
    world.limit(pool=world.pool, metric="tokens", amount=100_000)
    first, second = reserve().json()["id"], reserve().json()["id"]
    release = f"/api/v1/reservations/{first}/release"
    assert world.client().post(release, {"upstream_status": 429}, format="json").status_code == 200
    assert commit(world, second, upstream_status=503).status_code == 200
    entries = all_entries(world)

    entries_batch_write(stream=stream_of(world), entries=entries)
    entries_batch_write(stream=stream_of(world), entries=entries)

    adapted = PoolEvent.objects.get(kind="adapted")
    assert (adapted.pool, adapted.pool_pk, adapted.share) == ("shared", world.pool.id, 0.7)
    assert adapted.detail == {"was": "1.0000", "cause": "provider_429", "share": "0.7000"}
    opened = PoolEvent.objects.get(kind="breaker_opened")
    assert opened.detail["calls"] == "2" and opened.detail["failures"] == "1"
    assert PoolEvent.objects.count() == 2
    assert UsageEvent.objects.get(rid=first).upstream_status == 429


# -- a partitioned store: a stream per partition ----------------------------------------------


def test_events_of_tenants_on_different_partitions_are_each_written_once_though_ids_repeat(
    world: World, reserve: Any, three_partitions: Engine
) -> None:
    """Two tenants on two partitions reserve and commit, each on its own stream; both streams
    also hold a pool event and an unreadable entry under the same entry ids. Every reservation
    is one row, every pool event and dead letter one of its own (named by its partition), and
    reading everything again changes nothing."""
    engine = three_partitions
    other, other_client = tenant_elsewhere(world, "globex")
    ours, theirs = stream_of(world), usage_stream(engine.tenant_space(other.id).index)
    assert ours.key != theirs.key
    rids = {reserve().json()["id"] for _ in range(3)}
    rids |= {reserve(client=other_client).json()["id"] for _ in range(2)}
    for rid in sorted(rids)[:3]:
        response = world.client() if rid.startswith(f"rsv_{ours.partition:02x}") else other_client
        body = {"input_tokens": 80, "output_tokens": 40}
        assert (
            response.post(f"/api/v1/reservations/{rid}/commit", body, format="json").status_code
            == 200
        )
    # the same ids on both streams, past either's last
    last = max(
        int(stream.client.xinfo_stream(stream.key)["last-generated-id"].split("-")[0])
        for stream in (ours, theirs)
    )
    pool_event = {"type": "adapted", "pool": "shared", "at_ms": str(last), "share": "0.7000"}
    unreadable = {"type": "reserved", "rid": "x", "metadata": "[" * 10**5}
    for stream in (ours, theirs):
        stream.client.xadd(stream.key, pool_event, id=f"{last + 1}-0")
        stream.client.xadd(stream.key, unreadable, id=f"{last + 1}-1")

    report = usage_ingest()

    assert report.entries == 3 + 2 + 3 + 4 and report.parked == 2
    assert set(UsageEvent.objects.values_list("rid", flat=True)) == rids
    assert UsageEvent.objects.filter(state="committed").count() == 3
    assert {(e.entry_id, e.pool) for e in PoolEvent.objects.all()} == {
        (f"{ours.partition}:{last + 1}-0", "shared"),
        (f"{theirs.partition}:{last + 1}-0", "shared"),
    }
    assert set(DeadLetter.objects.values_list("entry_id", flat=True)) == {
        f"{ours.partition}:{last + 1}-1",
        f"{theirs.partition}:{last + 1}-1",
    }
    assert all(stream.backlog() == 0 for stream in usage_streams())
    assert LedgerState.objects.get().ingested_total == 3 + 2 + 3 + 4 - 2

    rows = list(UsageEvent.objects.order_by("rid").values())
    for stream in (ours, theirs):  # committed, never acknowledged: read again
        assert (
            entries_batch_write(stream=stream, entries=list(stream.client.xrange(stream.key))) == 1
        )
    assert usage_ingest().entries == 0
    assert [dict(row, ingested_ms=0) for row in UsageEvent.objects.order_by("rid").values()] == [
        dict(row, ingested_ms=0) for row in rows
    ]
    assert (PoolEvent.objects.count(), DeadLetter.objects.count()) == (2, 2)


def _unreachable(stream: LedgerStream, monkeypatch: pytest.MonkeyPatch, *methods: str) -> None:
    """The stream's store cannot serve these calls (its shard failing over)."""

    def down(*args: Any, **kwargs: Any) -> Any:
        raise redis.exceptions.SlotNotCoveredError("no master for the slot")

    for method in methods:
        monkeypatch.setattr(stream, method, down)


def test_a_partition_failing_over_leaves_the_others_ingested_and_its_events_for_later(
    world: World, reserve: Any, three_partitions: Engine, caplog: Any
) -> None:
    engine = three_partitions
    other, other_client = tenant_elsewhere(world, "globex")
    ours, theirs = stream_of(world), usage_stream(engine.tenant_space(other.id).index)
    ours_rid = reserve().json()["id"]
    theirs_rid = reserve(client=other_client).json()["id"]
    with pytest.MonkeyPatch.context() as shard_down, caplog.at_level(logging.WARNING):
        _unreachable(ours, shard_down, "ensure_group", "held", "read")
        report = usage_ingest()

    assert report.unreachable == (ours.partition,)
    assert report.entries == 1
    assert set(UsageEvent.objects.values_list("rid", flat=True)) == {theirs_rid}
    assert theirs.backlog() == 0
    assert len([r for r in caplog.records if ours.key in r.getMessage()]) == 1  # once a run

    assert usage_ingest().entries == 1  # the shard is back
    assert set(UsageEvent.objects.values_list("rid", flat=True)) == {ours_rid, theirs_rid}


def test_ingest_raises_when_no_stream_answers(
    world: World, reserve: Any, three_partitions: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    reserve()
    for stream in usage_streams():
        _unreachable(stream, monkeypatch, "ensure_group")
    with pytest.raises(redis.exceptions.SlotNotCoveredError):
        usage_ingest()
    assert not UsageEvent.objects.exists()


@pytest.mark.django_db(transaction=True)  # batches written in the writer's own thread
def test_a_failed_acknowledgement_is_its_own_streams_and_its_entries_are_read_again(
    three_partitions: Engine, world: World, reserve: Any
) -> None:
    """A batch in flight whose acknowledgement fails (its shard went away after the commit)
    fails its own stream, not the one being read meanwhile; its entries stay pending and are
    read again later, merging into the rows they made."""
    engine = three_partitions
    other, other_client = tenant_elsewhere(world, "globex")
    ours, theirs = stream_of(world), usage_stream(engine.tenant_space(other.id).index)
    rids = {reserve().json()["id"], reserve(client=other_client).json()["id"]}
    with pytest.MonkeyPatch.context() as shard_down:
        _unreachable(ours, shard_down, "ack")
        report = usage_ingest()

    assert report.unreachable == (ours.partition,)
    assert set(UsageEvent.objects.values_list("rid", flat=True)) == rids  # committed
    assert (ours.backlog(), theirs.backlog()) == (1, 0)
    rows = list(UsageEvent.objects.order_by("rid").values())

    assert usage_ingest().reclaimed == 1  # this process's own pending entry
    assert ours.backlog() == 0
    assert [dict(row, ingested_ms=0) for row in UsageEvent.objects.order_by("rid").values()] == [
        dict(row, ingested_ms=0) for row in rows
    ]
