"""Ingest: the usage stream into the ledger, exactly once.

Every entry is read through the ledger's consumer group and acknowledged only after the
transaction holding its row has committed; rows are upserted by reservation id and merged
(`ledger.events`). So a worker killed before the commit leaves its entries pending, and
another worker reclaims them (XAUTOCLAIM) once they have been idle long enough; a worker
killed between the commit and the acknowledgement leaves entries that are read again and
merge into the rows they already made. Nothing is lost and nothing is counted twice.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from django.db import connection, transaction
from django.db.models import F

from ledger.conf import ledger_setting
from ledger.events import Batch, Resolver, batch_from_entries
from ledger.models import LedgerState
from ledger.writer import refusal_rows_write, usage_rows_write
from quotas.engine.stream import Entry, UsageStream
from quotas.keys import api_keys_used
from quotas.plan import plans
from quotas.reservations import get_engine

log = logging.getLogger(__name__)

# Crash tests set this to a point's name: the process dies there, as a killed worker would.
FAULT_ENV = "LEDGER_FAULT_POINT"


@dataclass(frozen=True)
class IngestReport:
    batches: int = 0
    entries: int = 0
    reclaimed: int = 0


@lru_cache(maxsize=1)
def usage_stream() -> UsageStream:
    engine = get_engine()
    return UsageStream(engine.client, engine.keys.events, ledger_setting("LEDGER_GROUP"))


def consumer_name() -> str:
    """One consumer per process: what a dead process held is recognisably its own."""
    return f"{socket.gethostname()}-{os.getpid()}"


def usage_ingest(
    *, batch_size: int | None = None, max_seconds: float = 0.0, block_ms: int = 100
) -> IngestReport:
    """Reclaim what dead consumers left, then drain the stream in batches; with
    `max_seconds`, keep waiting for new entries that long (the beat task does)."""
    size = batch_size or ledger_setting("LEDGER_BATCH_SIZE")
    stream, consumer = usage_stream(), consumer_name()
    stream.ensure_group()
    deadline = time.monotonic() + max_seconds
    batches = entries = reclaimed = 0
    with BatchWriter(stream) as writer:
        idle_ms = ledger_setting("LEDGER_CLAIM_IDLE_MS")
        while claimed := writer.drained() and stream.claim(
            consumer, min_idle_ms=idle_ms, count=size
        ):
            writer.submit(claimed)
            batches, reclaimed = batches + 1, reclaimed + len(claimed)
        while True:
            wait = int(min(block_ms, (deadline - time.monotonic()) * 1000))
            read = stream.read(consumer, count=size, block_ms=wait if wait > 0 else None)
            if read:
                writer.submit(read)
                batches, entries = batches + 1, entries + len(read)
            elif time.monotonic() >= deadline:
                break
    return IngestReport(batches=batches, entries=entries + reclaimed, reclaimed=reclaimed)


class BatchWriter:
    """Writes each batch (and then acknowledges it); on PostgreSQL, in a thread of its own
    while the next batch is read and parsed, so that the database works on its core while
    Python reads. Outside an open transaction only: a thread has its own connection."""

    def __init__(self, stream: UsageStream) -> None:
        self.stream = stream
        self.resolver = Resolver(plans.get())
        background = connection.vendor == "postgresql" and not connection.in_atomic_block
        self.pool = ThreadPoolExecutor(max_workers=1) if background else None
        self.pending: Future[None] | None = None

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.drained()
        finally:
            if self.pool is not None:
                # the writer thread's own connection (looked up in that thread)
                self.pool.submit(lambda: connection.close()).result()
                self.pool.shutdown()

    def submit(self, entries: list[Entry]) -> None:
        batch = batch_from_entries(entries, self.resolver, int(time.time() * 1000))
        if self.pool is None:
            batch_write(stream=self.stream, batch=batch)
            return
        self.drained()
        self.pending = self.pool.submit(batch_write, stream=self.stream, batch=batch)

    def drained(self) -> bool:
        """Wait for the batch in flight (raising its error); True to read on."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()
        return True


def entries_batch_write(*, stream: UsageStream, entries: list[Entry]) -> None:
    batch = batch_from_entries(entries, Resolver(plans.get()), int(time.time() * 1000))
    batch_write(stream=stream, batch=batch)


def batch_write(*, stream: UsageStream, batch: Batch) -> None:
    """One transaction for the batch; the acknowledgement only once it has committed."""
    with transaction.atomic():
        ledger_state_lock(count=len(batch.ids), now_ms=int(time.time() * 1000))
        usage_rows_write(list(batch.usage.values()))
        refusal_rows_write(list(batch.refusals.values()))
        api_keys_used(last_used_ms=batch.keys_used)
        _fault("before_commit")
    _fault("after_commit")
    stream.ack(batch.ids)


def ledger_state_lock(*, count: int = 0, now_ms: int | None = None) -> None:
    """Take the ledger's row lock for the current transaction. Ingest takes it first, so
    whoever holds it sees a ledger no batch can change until it commits."""
    changes: dict[str, Any] = {"ingested_total": F("ingested_total") + count}
    if now_ms is not None:
        changes["last_ingest_ms"] = now_ms
    if not LedgerState.objects.filter(pk=1).update(**changes):
        LedgerState.objects.get_or_create(pk=1)
        LedgerState.objects.filter(pk=1).update(**changes)


def _fault(point: str) -> None:
    if os.environ.get(FAULT_ENV) == point:
        log.error("fault injection: exiting at %s", point)
        os._exit(75)


def usage_stream_trim() -> int:
    """Drop what every consumer group has acknowledged, and forget long-dead consumers."""
    stream = usage_stream()
    stream.forget_idle_consumers(idle_ms=ledger_setting("LEDGER_CONSUMER_IDLE_MS"))
    return get_engine().trim_events()
