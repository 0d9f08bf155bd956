"""A usage event the database refuses is parked as a dead letter; the rest of its batch, other
tenants' events included, is written and acknowledged exactly once, and the stream moves on."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.db import connection
from rest_framework.test import APIClient

from ledger.models import DeadLetter, UsageEvent
from ledger.services import entries_batch_write, usage_ingest, usage_stream_trim, usage_streams
from quotas.engine.stream import Entry
from quotas.keys import api_key_create
from quotas.plan import plans
from tests.factories import FeatureFactory, TenantFactory
from tests.fixtures import World
from tests.ledger import test_worker
from tests.ledger.partitions import stream_of
from tests.ledger.stack import wait_until
from tests.ledger.test_worker import Workers, drained

pytestmark = pytest.mark.django_db
workers, worker_database = test_worker.workers, test_worker.worker_database

# A committed event's field as the stream holds it, which the database refuses.
BAD_VALUES: dict[str, tuple[str, bytes]] = {
    # bytes that are not UTF-8: read as lone surrogates, which no driver encodes
    "not UTF-8": ("finish_reason", b"stop\xff\xed\xa0\x80"),
    "out of a column's range": ("output_tokens", b"1" + b"0" * 20),
    "NUL in text": ("finish_reason", b"st\x00op"),
}
# What a backend stores as it is: the event is written, nothing is parked.
ACCEPTED = {("sqlite", "NUL in text")}


def _other_tenant_client() -> APIClient:
    tenant = TenantFactory(slug="globex")
    FeatureFactory(tenant=tenant, slug="chat", priority="interactive")
    issued = api_key_create(tenant=tenant, name="test")
    plans.clear()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {issued.secret}")
    return client


def _commit(client: APIClient, rid: str, output_tokens: int) -> None:
    body = {"input_tokens": 50, "output_tokens": output_tokens}
    response = client.post(f"/api/v1/reservations/{rid}/commit", body, format="json")
    assert response.status_code == 200, response.content


def _traffic(world: World, reserve: Any, bad: str) -> tuple[list[str], str, str]:
    """Both tenants reserve and commit; one commit of acme's, among the others, carries a
    value the database refuses. Returns the good rids, the bad event's rid and entry id."""
    globex = _other_tenant_client()
    acme_rids = [reserve().json()["id"] for _ in range(3)]
    globex_rids = [reserve(client=globex).json()["id"] for _ in range(2)]
    victim = reserve().json()["id"]
    _commit(world.client(), acme_rids[0], 11)
    _commit(globex, globex_rids[0], 12)
    stream = stream_of(world)
    committed = next(f for _, f in stream.client.xrange(stream.key) if f["type"] == "committed")
    name, value = BAD_VALUES[bad]
    fields: dict[str, Any] = {**committed, "rid": victim, name: value}
    bad_id = stream.client.xadd(stream.key, fields)
    _commit(world.client(), acme_rids[1], 13)
    _commit(globex, globex_rids[1], 14)
    return acme_rids + globex_rids, victim, bad_id


def _assert_good_rows(rids: list[str], victim: str) -> None:
    rows = {row.rid: row for row in UsageEvent.objects.all()}
    assert set(rows) == {*rids, victim}
    assert {rows[rid].tenant for rid in rids} == {"acme", "globex"}
    committed = sorted(row.output_tokens for row in rows.values() if row.state == "committed")
    assert committed == [11, 12, 13, 14]
    assert rows[victim].state == "held"  # its reservation was written, its bad commit parked


@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_a_batch_with_an_unstorable_event_writes_the_others_and_parks_it(
    world: World, reserve: Any, bad: str
) -> None:
    rids, victim, bad_id = _traffic(world, reserve, bad)
    stream = stream_of(world)
    as_read = dict(stream.client.xrange(stream.key, bad_id, bad_id)[0][1])

    report = usage_ingest()

    if (connection.vendor, bad) in ACCEPTED:
        assert report.parked == 0 and not DeadLetter.objects.exists()
        assert UsageEvent.objects.get(rid=victim).state == "committed"
        return
    assert report.parked == 1
    _assert_good_rows(rids, victim)
    letter = DeadLetter.objects.get()
    # named by its partition when there are several (entry ids of two streams can be equal)
    assert (letter.entry_id, letter.rid, letter.event_type) == (
        stream.label + bad_id,
        victim,
        "committed",
    )
    assert json.loads(letter.fields) == as_read  # exactly as received, bad bytes included
    assert letter.fields.isascii() and letter.error
    assert stream.backlog() == 0
    usage_stream_trim()
    assert stream.client.xlen(stream.key) == 0  # trimmed past the bad entry


@pytest.mark.parametrize("bad", ["not UTF-8", "out of a column's range"])
def test_entries_read_again_park_nothing_twice_and_write_no_duplicate(
    world: World, reserve: Any, bad: str
) -> None:
    rids, victim, _ = _traffic(world, reserve, bad)
    for stream in usage_streams():  # both tenants' partitions
        entries: list[Entry] = list(stream.client.xrange(stream.key))
        parked = 1 if stream.key == stream_of(world).key else 0
        assert entries_batch_write(stream=stream, entries=entries) == parked
        # committed, not acked
        assert entries_batch_write(stream=stream, entries=entries) == parked

    assert DeadLetter.objects.count() == 1
    _assert_good_rows(rids, victim)
    assert UsageEvent.objects.count() == len(rids) + 1


def test_an_entry_that_cannot_be_read_is_parked_too(world: World, reserve: Any) -> None:
    rid = reserve().json()["id"]
    stream = stream_of(world)
    bad_id = stream.client.xadd(
        stream.key, {"type": "reserved", "rid": "x", "metadata": "[" * 10**5}
    )

    report = usage_ingest()

    assert report.parked == 1 and DeadLetter.objects.get().entry_id == stream.label + bad_id
    assert UsageEvent.objects.get().rid == rid


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_worker_parks_the_bad_event_and_writes_the_rest_once(
    world: World, reserve: Any, workers: Workers
) -> None:
    rids, victim, bad_id = _traffic(world, reserve, "not UTF-8")
    workers.start(LEDGER_BATCH_SIZE="4")  # several batches: on PostgreSQL, written by a thread
    workers.ingest()
    wait_until(lambda: drained(world), seconds=30, what="the worker to drain the stream")
    workers.ingest()  # a second run finds nothing to do
    wait_until(lambda: drained(world), seconds=30, what="the second run")

    workers.database.sync()
    _assert_good_rows(rids, victim)
    named = stream_of(world).label + bad_id
    assert list(DeadLetter.objects.values_list("entry_id", flat=True)) == [named]
