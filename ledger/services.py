"""Ingest: the usage stream into the ledger, exactly once.

Every entry is read through the ledger's consumer group and acknowledged only after the
transaction holding its row has committed; on a partitioned store each partition has its
stream (and the group on it), drained in turn, and an entry is named by its partition and its
id (two streams can hold the same id); rows are upserted by reservation id and merged
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
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import redis
from django.db import (
    DataError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    connection,
    transaction,
)
from django.db.models import F, Q
from django.db.models.functions import Coalesce

from ledger.conf import ledger_setting
from ledger.events import Batch, Resolver, Row, batch_from_entries, dead_letter_row
from ledger.models import LedgerState, UsageEvent
from ledger.writer import (
    dead_letters_write,
    pool_events_write,
    refusal_rows_write,
    usage_rows_write,
)
from quotas.engine.stream import Entry, UsageStream
from quotas.engine.types import MAX_TTL
from quotas.keys import api_keys_used
from quotas.plan import plans
from quotas.reservations import get_engine
from quotas.store import STORE_UNREACHABLE

log = logging.getLogger(__name__)

# Crash tests set this to a point's name: the process dies there, as a killed worker would.
FAULT_ENV = "LEDGER_FAULT_POINT"

# What a stored value makes the database (or its driver) refuse, and would make it refuse
# again: a string with NUL or a lone surrogate, a number out of a column's range, a text too
# long. A batch failing so is isolated and the entries at fault parked. Any other error (the
# database unreachable, a lock timeout, a faulty statement) fails the batch as before: its
# entries stay pending and are read again.
ENTRY_ERRORS = (DataError, IntegrityError, ValueError, OverflowError)
# Never an entry's fault, even while reading one.
TRANSIENT_ERRORS = (OperationalError, InterfaceError, redis.RedisError)


@dataclass(frozen=True)
class IngestReport:
    batches: int = 0
    entries: int = 0
    reclaimed: int = 0
    parked: int = 0
    unreachable: tuple[int, ...] = ()  # partitions whose stream was left (store unreachable)


class LedgerStream(UsageStream):
    """A partition's usage stream as the ledger reads it. `label` names its entries where the
    ledger keeps their ids (pool events, dead letters): empty on one partition, `<i>:` on
    several, since entry ids of different streams can be equal."""

    def __init__(self, client: redis.Redis, key: str, group: str, *, partition: int = 0) -> None:
        super().__init__(client, key, group)
        self.partition = partition
        self.label = f"{partition}:" if get_engine().partitioned else ""

    def named(self, entries: list[Entry]) -> list[Entry]:
        """The entries with their ids as the ledger stores them."""
        if not self.label:
            return entries
        return [(self.label + entry_id, fields) for entry_id, fields in entries]


@cache
def usage_stream(partition: int = 0) -> LedgerStream:
    """One partition's stream (the home partition's by default)."""
    engine = get_engine()
    space = engine.spaces[partition]
    return LedgerStream(
        engine.client, space.events, ledger_setting("LEDGER_GROUP"), partition=partition
    )


def usage_streams() -> list[LedgerStream]:
    """Every partition's stream, in partition order."""
    return [usage_stream(space.index) for space in get_engine().spaces]


def consumer_name() -> str:
    """One consumer per process: what a dead process held is recognisably its own."""
    return f"{socket.gethostname()}-{os.getpid()}"


def usage_ingest(
    *, batch_size: int | None = None, max_seconds: float = 0.0, block_ms: int = 100
) -> IngestReport:
    """Finish what this process left pending, reclaim what dead consumers left, then drain
    the streams in batches; with `max_seconds`, keep waiting for new entries that long (the
    beat task does). Each partition's stream in turn, round by round, so that none waits on
    another's backlog. A stream whose store cannot serve (a shard failing over) is left for
    the rest of the run, its entries waiting in it, while the others are drained; the run
    raises only when every stream failed."""
    size = batch_size or ledger_setting("LEDGER_BATCH_SIZE")
    streams, consumer = usage_streams(), consumer_name()
    skipped = _Skipped(streams)
    for stream in skipped.live():
        with skipped.isolated(stream):
            stream.ensure_group()
    deadline = time.monotonic() + max_seconds
    batches = entries = reclaimed = 0
    with BatchWriter(on_unreachable=skipped.fail) as writer:
        for stream in skipped.live():
            # This process's own unacknowledged entries first (a task of it failed mid-batch,
            # e.g. Redis restarted): they are ours, no need to wait until they look abandoned.
            with skipped.isolated(stream):
                while skipped.drained(writer, stream) and (
                    held := stream.held(consumer, count=size)
                ):
                    writer.submit(stream, held)
                    batches, reclaimed = batches + 1, reclaimed + len(held)
        idle_ms = ledger_setting("LEDGER_CLAIM_IDLE_MS")
        for stream in skipped.live():
            with skipped.isolated(stream):
                while skipped.drained(writer, stream) and (
                    claimed := stream.claim(consumer, min_idle_ms=idle_ms, count=size)
                ):
                    writer.submit(stream, claimed)
                    batches, reclaimed = batches + 1, reclaimed + len(claimed)
        while live := skipped.live():
            wait = int(min(block_ms, (deadline - time.monotonic()) * 1000))
            # a blocking read per stream: the wait shared among them (never 0: for ever)
            block = max(1, wait // len(live)) if wait > 0 else None
            read_any = False
            for stream in live:
                if stream in skipped.failed:  # its batch in flight failed meanwhile
                    continue
                with skipped.isolated(stream):
                    read = stream.read(consumer, count=size, block_ms=block)
                    if read:
                        writer.submit(stream, read)
                        batches, entries = batches + 1, entries + len(read)
                        read_any = True
            if not read_any and time.monotonic() >= deadline:
                break
    skipped.raise_if_all()
    return IngestReport(
        batches=batches,
        entries=entries + reclaimed,
        reclaimed=reclaimed,
        parked=writer.parked,
        unreachable=skipped.partitions(),
    )


class _Skipped:
    """The streams of one ingest run whose store could not serve, each with its first error:
    logged once, then left alone for the rest of the run."""

    def __init__(self, streams: list[LedgerStream]) -> None:
        self.streams = streams
        self.failed: dict[UsageStream, Exception] = {}

    def live(self) -> list[LedgerStream]:
        return [stream for stream in self.streams if stream not in self.failed]

    def fail(self, stream: UsageStream, exc: Exception) -> None:
        if stream in self.failed:
            return
        self.failed[stream] = exc
        log.warning(
            "ledger: usage stream %s unreachable, left until the next run: %s: %s",
            stream.key,
            type(exc).__name__,
            exc,
        )

    @contextmanager
    def isolated(self, stream: UsageStream) -> Iterator[None]:
        try:
            yield
        except STORE_UNREACHABLE as exc:
            self.fail(stream, exc)

    def drained(self, writer: BatchWriter, stream: UsageStream) -> bool:
        """Wait for the batch in flight; True to read on from `stream` (it has not failed,
        whichever stream that batch was of)."""
        return writer.drained() and stream not in self.failed

    def raise_if_all(self) -> None:
        if self.streams and len(self.failed) == len(self.streams):
            raise next(iter(self.failed.values()))

    def partitions(self) -> tuple[int, ...]:
        return tuple(sorted(s.partition for s in self.streams if s in self.failed))


class BatchWriter:
    """Writes each batch (and then acknowledges it); on PostgreSQL, in a thread of its own
    while the next batch is read and parsed, so that the database works on its core while
    Python reads. Outside an open transaction only: a thread has its own connection. With
    `on_unreachable`, a batch whose stream's store cannot serve (its acknowledgement failed:
    its entries stay pending, read again later) is handed to it with the error, as the
    batch's stream's failure, instead of raising where the writer is waited for."""

    def __init__(
        self, *, on_unreachable: Callable[[UsageStream, Exception], None] | None = None
    ) -> None:
        self.resolver = Resolver(plans.get())
        background = connection.vendor == "postgresql" and not connection.in_atomic_block
        self.pool = ThreadPoolExecutor(max_workers=1) if background else None
        self.pending: tuple[UsageStream, Future[int]] | None = None
        self.parked = 0
        self.on_unreachable = on_unreachable

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

    def submit(self, stream: UsageStream, entries: list[Entry]) -> None:
        batch = batch_parse(_named(stream, entries), self.resolver)
        if self.pool is None:
            with self._of(stream):
                self.parked += batch_write(stream=stream, entries=entries, batch=batch)
            return
        self.drained()
        future = self.pool.submit(batch_write, stream=stream, entries=entries, batch=batch)
        self.pending = (stream, future)

    def drained(self) -> bool:
        """Wait for the batch in flight (raising its error, or handing a store's to
        `on_unreachable`); True to read on."""
        pending, self.pending = self.pending, None
        if pending is not None:
            stream, future = pending
            with self._of(stream):
                self.parked += future.result()
        return True

    @contextmanager
    def _of(self, stream: UsageStream) -> Iterator[None]:
        try:
            yield
        except STORE_UNREACHABLE as exc:
            if self.on_unreachable is None:
                raise
            self.on_unreachable(stream, exc)


def batch_parse(entries: list[Entry], resolver: Resolver) -> Batch | None:
    """The entries as one batch of rows; None when one of them cannot be read (the batch is
    then isolated entry by entry when it is written)."""
    try:
        return batch_from_entries(entries, resolver, int(time.time() * 1000))
    except TRANSIENT_ERRORS:
        raise
    except Exception:
        log.warning("ledger: a batch of %d entries could not be read", len(entries), exc_info=True)
        return None


def _named(stream: UsageStream, entries: list[Entry]) -> list[Entry]:
    """The entries with their ids as the ledger stores them (see LedgerStream.named)."""
    return stream.named(entries) if isinstance(stream, LedgerStream) else entries


def entries_batch_write(*, stream: UsageStream, entries: list[Entry]) -> int:
    """Write and acknowledge these entries (as `stream` gave them) as one batch; the number
    parked."""
    resolver = Resolver(plans.get())
    batch = batch_parse(_named(stream, entries), resolver)
    return batch_write(stream=stream, entries=entries, batch=batch)


def batch_write(*, stream: UsageStream, entries: list[Entry], batch: Batch | None) -> int:
    """One transaction for the batch; the acknowledgement only once it has committed. When the
    database refuses a value of the batch, the batch is written again with the entries it
    refuses parked as dead letters (`batch_isolate`). Returns how many were parked. `entries`
    as the stream gave them; `batch` made of them as named (`_named`)."""
    if batch is not None:
        try:
            batch_commit(batch)
        except ENTRY_ERRORS as error:
            log.warning("ledger: a batch of %d entries failed: %s", len(entries), error)
            batch = None
    parked = batch_isolate(_named(stream, entries)) if batch is None else 0
    _fault("after_commit")
    stream.ack([entry_id for entry_id, _ in entries])
    return parked


def batch_commit(batch: Batch) -> None:
    with transaction.atomic():
        ledger_state_lock(count=len(batch.ids), now_ms=int(time.time() * 1000))
        batch_rows_write(batch)
        _fault("before_commit")


def batch_rows_write(batch: Batch) -> None:
    usage_rows_write(list(batch.usage.values()))
    refusal_rows_write(list(batch.refusals.values()))
    pool_events_write(batch.pool_events)
    api_keys_used(last_used_ms=batch.keys_used)


def batch_isolate(entries: list[Entry]) -> int:
    """The batch again in one transaction: every entry that can be stored is, the others are
    parked (`DeadLetter`); the number parked."""
    resolver, now_ms = Resolver(plans.get()), int(time.time() * 1000)
    readable, parked = [], []
    for entry in entries:
        try:
            batch_from_entries([entry], resolver, now_ms)
        except TRANSIENT_ERRORS:
            raise
        except Exception as error:
            parked.append(dead_letter_row(entry, error))
        else:
            readable.append(entry)
    with transaction.atomic():
        ledger_state_lock(now_ms=now_ms)
        parked += entries_bisect(readable, resolver, now_ms)
        ledger_state_lock(count=len(entries) - len(parked))
        dead_letters_write(parked)
        _fault("before_commit")
    for row in parked:
        log.error("ledger: entry %s parked as a dead letter: %s", row["entry_id"], row["error"])
    return len(parked)


def entries_bisect(entries: list[Entry], resolver: Resolver, now_ms: int) -> list[Row]:
    """Write the entries in a savepoint; when the database refuses them, each half on its own,
    down to the single entries it refuses, which are returned as dead letters. A batch with
    k bad entries among n costs about 2k·log2(n) statements."""
    if not entries:
        return []
    try:
        with transaction.atomic():
            batch_rows_write(batch_from_entries(entries, resolver, now_ms))
        return []
    except ENTRY_ERRORS as error:
        if len(entries) == 1:
            return [dead_letter_row(entries[0], error)]
    half = len(entries) // 2
    return entries_bisect(entries[:half], resolver, now_ms) + entries_bisect(
        entries[half:], resolver, now_ms
    )


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
    """Drop what every consumer group has acknowledged, and forget long-dead consumers, on
    every partition's stream."""
    for stream in usage_streams():
        stream.forget_idle_consumers(idle_ms=ledger_setting("LEDGER_CONSUMER_IDLE_MS"))
    return get_engine().trim_events()


def degraded_leases_expire(*, now_ms: int | None = None) -> int:
    """Expire degraded reservations held past their expiry: admitted while the store was
    down, they have no lease in Redis for the reaper to expire, so the ledger does it, charged
    as reserved like any expired lease; a later commit still turns the row into a commit after
    expiry. A reservation whose event carried no expiry (written before they did) is given
    the longest TTL the API grants. Returns how many expired."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    longest_ms = MAX_TTL * 1000
    due = Q(expires_ms__lt=now_ms) | Q(expires_ms__isnull=True, created_ms__lt=now_ms - longest_ms)
    with transaction.atomic():
        ledger_state_lock()  # after any batch in flight, so its commit merges, not races
        return UsageEvent.objects.filter(due, state="held", degraded=True).update(
            state="expired",
            finished_ms=Coalesce(F("expires_ms"), F("created_ms") + longest_ms),
            ingested_ms=now_ms,  # so the rollups count it
        )
