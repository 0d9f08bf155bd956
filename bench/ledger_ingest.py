"""Ledger ingest into PostgreSQL: events per second by batch size, against a naive
row-by-row baseline in the same run, and the commit-to-ledger lag under a steady load.

    .venv/bin/python -m bench.ledger_ingest [--events 100000] [--rate 4000] [--seconds 10]

It starts its own Redis (bench.redisserver) and uses its own PostgreSQL database (created and
migrated if missing, emptied before each run): --database-url, default
postgres://postgres@127.0.0.1:5432/ledger_bench. Events are written to the stream with the
fields and sizes the engine writes (a reserved and a committed event per reservation, the
commit a few thousand entries after its reservation, 2% refusals), then drained by the ledger's
own ingest service, in this process, as a Celery worker would run it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import django
import psycopg

from bench.redisserver import redis_server_start
from bench.results import percentile

DEFAULT_DATABASE = "postgres://postgres@127.0.0.1:5432/ledger_bench"
COMMIT_DISTANCE = 2000  # entries between a reservation and its commit
TARGET = 20_000


def database_ensure(url: str) -> None:
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = parts._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')


def reservation_events(n: int, now_ms: int) -> tuple[dict[str, str], dict[str, str]]:
    rid = f"rsv_{n:024x}"
    base = {
        "rid": rid,
        "tenant": f"tenant-{n % 50}",
        "feature": f"feature-{n % 500}",
        "model": "gpt-4o-mini",
        "priority": "standard",
        "key": "0123456789ab",
        "estimated": "0",
        "pool": "shared",
        "created_ms": str(now_ms),
        "reserved_input_tokens": str(800 + n % 4000),
        "reserved_output_tokens": "1000",
        "reserved_cost_nusd": "720000",
    }
    reserved = {**base, "type": "reserved", "at_ms": str(now_ms), "granted_output_tokens": "1000"}
    committed = {
        **base,
        "type": "committed",
        "at_ms": str(now_ms + 900),
        "input_tokens": str(800 + n % 4000),
        "cached_input_tokens": "0",
        "output_tokens": str(n % 1000),
        "cost_nusd": "330000",
        "finish_reason": "length" if n % 20 == 0 else "stop",
        "upstream_status": "200",
        "latency_ms": "850",
        "lease_expired": "0",
    }
    return reserved, committed


def refusal_event(n: int, now_ms: int) -> dict[str, str]:
    return {"type": "refused", "rid": f"rsv_r{n:023x}", "at_ms": str(now_ms), "reason":
            "rate_limited", "limit": "7", "tenant": "tenant-1", "feature": "feature-1",
            "model": "gpt-4o-mini", "priority": "batch", "reserved_input_tokens": "900",
            "reserved_output_tokens": "1000"}  # fmt: skip


def stream_fill(client: Any, key: str, events: int) -> None:
    """`events` entries: reservations and their commits COMMIT_DISTANCE apart, 2% refusals."""
    now = int(time.time() * 1000)
    pairs = [reservation_events(n, now) for n in range(events // 2)]
    pipe, written, n = client.pipeline(transaction=False), 0, 0
    commits: list[dict[str, str]] = []
    while written < events:
        if n < len(pairs):
            pipe.xadd(key, pairs[n][0] if n % 50 else refusal_event(n, now))
            commits.append(pairs[n][1])
            n += 1
        if len(commits) > COMMIT_DISTANCE // 2 or n >= len(pairs):
            pipe.xadd(key, commits.pop(0))
        written = n + (n - len(commits))
        if len(pipe) >= 5000:
            pipe.execute()
    pipe.execute()


def ledger_reset() -> None:
    from django.db import connection

    from ledger.services import usage_stream

    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE ledger_usageevent, ledger_refusal, ledger_ledgerstate")
    stream = usage_stream()
    stream.client.delete(stream.key)


@dataclass
class Run:
    name: str
    batch: int
    events: int
    seconds: float
    cpu_seconds: float = 0.0  # of this process (both its threads); 0: not measured

    @property
    def cpu_rate(self) -> str:
        """Events per CPU-second of the ingest process: what one free core would do, however
        busy the machine is (the database works on another core meanwhile)."""
        return f"{self.events / self.cpu_seconds:,.0f}" if self.cpu_seconds else "-"

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def run_ingest(name: str, batch: int, events: int, write: Any = None) -> Run:
    import ledger.services as services
    from ledger.models import UsageEvent

    ledger_reset()
    stream = services.usage_stream()
    stream_fill(stream.client, stream.key, events)
    original = services.usage_rows_write
    if write is not None:
        services.usage_rows_write = write
    try:
        started, cpu = time.perf_counter(), time.process_time()
        services.usage_ingest(batch_size=batch)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        services.usage_rows_write = original
    assert stream.backlog() == 0 and UsageEvent.objects.count() > events * 0.45
    return Run(name, batch, events, seconds, cpu)


def _drain(batch: int, start: Any) -> None:
    django.setup()
    from ledger.services import usage_ingest, usage_stream

    usage_stream().ensure_group()
    start.wait()
    usage_ingest(batch_size=batch)


def run_parallel(processes: int, batch: int, events: int) -> Run:
    """Several consumers of the group at once, as several Celery workers would be."""
    from ledger.services import usage_stream

    ledger_reset()
    stream = usage_stream()
    stream_fill(stream.client, stream.key, events)
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(processes + 1)
    workers = [context.Process(target=_drain, args=(batch, start)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    start.wait()  # every process has set Django up: the clock starts now
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - began
    assert stream.backlog() == 0
    return Run(f"COPY, {processes} consumer processes", batch, events, seconds)


def run_naive(events: int) -> Run:
    """The baseline: each event its own ORM read-modify-write and transaction, then its ack."""
    from django.db import transaction

    from ledger.events import Resolver, usage_row
    from ledger.models import UsageEvent
    from ledger.services import consumer_name, usage_stream
    from quotas.plan import plans

    ledger_reset()
    stream = usage_stream()
    stream_fill(stream.client, stream.key, events)
    stream.ensure_group()
    resolver, consumer = Resolver(plans.get()), consumer_name()
    started, cpu = time.perf_counter(), time.process_time()
    while entries := stream.read(consumer, count=100):
        for entry_id, fields in entries:
            row = usage_row(fields, resolver, int(time.time() * 1000))
            if row is not None:
                with transaction.atomic():
                    UsageEvent.objects.update_or_create(rid=row.pop("rid"), defaults=row)
            stream.ack([entry_id])
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return Run("naive: a transaction per event", 1, events, seconds, cpu)


def _steady_producer(url: str, key: str, rate: int, seconds: float) -> None:
    """Reservations and their commits (300 ms later) at `rate` events per second."""
    import redis

    client = redis.Redis.from_url(url)
    pending: list[tuple[float, dict[str, str]]] = []
    start, n = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        due = start + n * 2 / rate
        time.sleep(max(0.0, due - time.monotonic()))
        now = time.time()
        reserved, committed = reservation_events(n, int(now * 1000))
        pipe = client.pipeline(transaction=False)
        pipe.xadd(key, reserved)
        while pending and pending[0][0] <= now:
            event = pending.pop(0)[1]
            pipe.xadd(key, {**event, "at_ms": str(int(time.time() * 1000))})
        pipe.execute()
        pending.append((now + 0.3, committed))
        n += 1


def _steady_consumer(seconds: float) -> None:
    django.setup()
    from ledger.services import usage_ingest

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        usage_ingest(max_seconds=0.9)  # what the beat task does every second


def _wait_for_group(stream: Any) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if stream.client.exists(stream.key) and stream.client.xinfo_groups(stream.key):
            return
        time.sleep(0.05)
    raise RuntimeError("the ingest process did not start")


def run_lag(url: str, rate: int, seconds: float) -> tuple[int, float, float, float]:
    from ledger.models import UsageEvent
    from ledger.services import usage_stream

    ledger_reset()
    key = usage_stream().key
    context = multiprocessing.get_context("spawn")
    producer = context.Process(target=_steady_producer, args=(url, key, rate, seconds))
    consumer = context.Process(target=_steady_consumer, args=(seconds + 3,))
    consumer.start()
    _wait_for_group(usage_stream())  # the consumer is set up and reading: now the load
    producer.start()
    producer.join()
    consumer.join()
    lags = sorted(
        float(ingested - finished)
        for ingested, finished in UsageEvent.objects.filter(state="committed").values_list(
            "ingested_ms", "finished_ms"
        )
    )
    return len(lags), percentile(lags, 0.5), percentile(lags, 0.95), lags[-1] if lags else 0.0


def report(runs: list[Run], baseline: Run, lag: tuple[int, float, float, float], rate: int) -> str:
    header = (
        f"{'ingest':<40} {'batch':>6} {'events':>8} {'seconds':>8} {'events/s':>9} "
        f"{'x naive':>8} {'events/cpu-s':>12}"
    )
    lines = [header, "-" * len(header)]
    for run in [baseline, *runs]:
        ratio = run.rate / baseline.rate
        lines.append(
            f"{run.name:<40} {run.batch:>6} {run.events:>8} {run.seconds:>8.2f} "
            f"{run.rate:>9,.0f} {ratio:>8.1f} {run.cpu_rate:>12}"
        )
    best = max(r.rate for r in runs)
    per_core = max(r.events / r.cpu_seconds for r in runs if r.cpu_seconds)
    lines.append(
        f"target >= {TARGET:,} events/s: wall clock {'met' if best >= TARGET else 'NOT met'} "
        f"({best:,.0f}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores); "
        f"per CPU-second of the ingest process {'met' if per_core >= TARGET else 'NOT met'} "
        f"({per_core:,.0f})"
    )
    count, p50, p95, worst = lag
    lines.append(
        f"lag commit -> ledger row at {rate:,} events/s: p50 {p50:.0f} ms, p95 {p95:.0f} ms, "
        f"max {worst:.0f} ms over {count:,} commits"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ledger_ingest", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--database-url", default=DEFAULT_DATABASE)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--naive-events", type=int, default=5_000)
    parser.add_argument("--rate", type=int, default=4_000, help="events/s for the lag run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the lag run")
    args = parser.parse_args(argv)
    database_ensure(args.database_url)
    server = redis_server_start()
    os.environ.update(DJANGO_SETTINGS_MODULE="config.settings", DATABASE_URL=args.database_url,
                      REDIS_URL=server.url, LOG_LEVEL="WARNING")  # fmt: skip
    try:
        django.setup()
        from django.core.management import call_command

        from ledger import writer

        call_command("migrate", verbosity=0, interactive=False)
        baseline = run_naive(args.naive_events)
        runs = [
            run_ingest("COPY + one upsert per batch", b, args.events) for b in (100, 1000, 10_000)
        ]
        runs.append(run_parallel(2, 10_000, args.events))
        executemany = writer._usage_executemany  # SQLite's path, for comparison
        runs.append(run_ingest("executemany upsert", 1000, args.events // 5, executemany))
        lag = run_lag(server.url, args.rate, args.seconds)
        print(report(runs, baseline, lag, args.rate))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
