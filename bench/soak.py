"""Soak: the API under a steady mixed load for minutes, and what it leaves behind.

    .venv/bin/python -m bench.soak [--minutes 5] [--connections 64]

Starts a Redis of its own and a database of its own (var/soak.sqlite3, wiped at start, or
--database-url), configured as `python -m bench` is (`bench/fixtures.py`), serves the app
under gunicorn (bench/server.py) beside a Celery worker with beat (the product's schedule:
lease reaper, ledger ingest and stream trim, rollups, alerts), and drives it with wrk
(bench/wrk/soak.lua): every reserve is followed by its commit, its release or nothing (left
to expire after its TTL), in turn. Then it waits for the ledger to catch up and the abandoned
leases to expire, and prints the answers by status class, the web and Celery workers' RSS and
Redis's used_memory before and after, the stream's length, the leases still held, and the
ledger's rows against the commits and releases the API acknowledged.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from bench.harness import COMMIT_BODY, RESERVE_BODY
from bench.redisserver import redis_server_start
from bench.results import LoadResult
from bench.server import Server, ServerOptions, server_start
from bench.wrk import WrkOptions, wrk_require, wrk_run

ROOT = Path(__file__).resolve().parent.parent
CELERY = Path(sys.executable).parent / "celery"
CELERY_LOG = ROOT / "var" / "soak-celery.log"
TTL_SECONDS = 10  # abandoned leases expire within the run and are reaped by beat
SETTLE_TIMEOUT_S = 120.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--workers", type=int, default=cores, help="gunicorn workers")
    p.add_argument("--wrk-threads", type=int, default=cores)
    p.add_argument("--port", type=int, default=8775)
    p.add_argument("--database-url", default=f"sqlite:///{ROOT / 'var' / 'soak.sqlite3'}")
    return p.parse_args(argv)


@dataclass
class Mark:
    """What the server side holds at one moment."""

    web_rss_kb: list[int]
    celery_rss_kb: int
    used_memory: int
    stream_length: int
    stream_bytes: int
    leases_held: int


def rss_kb(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((ln for ln in status.splitlines() if ln.startswith("VmRSS:")), "VmRSS: 0 kB")
    return int(line.split()[1])


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def celery_start() -> subprocess.Popen[bytes]:
    """One worker (solo pool: one task at a time, as SQLite likes it) with beat inside."""
    command = [
        str(CELERY),
        "-A",
        "config",
        "worker",
        "--beat",
        "--pool=solo",
        "--loglevel=WARNING",
        f"--schedule={ROOT / 'var' / 'soak-celerybeat-schedule'}",
    ]
    with CELERY_LOG.open("ab") as log:
        return subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def process_stop(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def mark(client: redis.Redis, server: Server, celery: subprocess.Popen[bytes]) -> Mark:
    from quotas.store import get_engine

    keys = get_engine().keys
    return Mark(
        web_rss_kb=[rss_kb(pid) for pid in children(server.process.pid)],
        celery_rss_kb=rss_kb(celery.pid),
        used_memory=int(client.info("memory")["used_memory"]),
        stream_length=int(client.xlen(keys.events)),
        stream_bytes=int(client.memory_usage(keys.events, samples=0) or 0),
        leases_held=int(client.zcard(keys.leases)),
    )


def warm_up(url: str, api_key: str, pairs: int = 200) -> None:
    """Every worker loads its plan and imports before the first mark."""
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
        for _ in range(pairs):
            rid = c.post("/api/v1/reservations", json=RESERVE_BODY).json()["id"]
            c.post(f"/api/v1/reservations/{rid}/commit", json=COMMIT_BODY)


def settle(client: redis.Redis, deadline_s: float) -> float:
    """Waits until no lease is held and the ledger has read and acknowledged every event;
    returns the seconds it took."""
    from quotas.store import get_engine

    keys = get_engine().keys
    started = time.monotonic()
    while time.monotonic() - started < deadline_s:
        groups = client.xinfo_groups(keys.events) if client.exists(keys.events) else []
        behind = sum(int(g.get("lag") or 0) + int(g["pending"]) for g in groups)
        if groups and behind == 0 and client.zcard(keys.leases) == 0:
            break
        time.sleep(1)
    return time.monotonic() - started


def ledger_counts() -> dict[str, int]:
    from django.db.models import Count

    from ledger.models import UsageEvent

    rows = UsageEvent.objects.values("state").annotate(n=Count("id"))
    return {row["state"]: row["n"] for row in rows}


def load(url: str, api_key: str, args: argparse.Namespace) -> LoadResult:
    body = {**RESERVE_BODY, "ttl_seconds": TTL_SECONDS}
    return wrk_run(
        url=url + "/api/v1/reservations",
        script="soak.lua",
        seconds=args.minutes * 60,
        options=WrkOptions(threads=args.wrk_threads, connections=args.connections),
        env={
            "BENCH_KEY": api_key,
            "BENCH_BODY": json.dumps(body),
            "BENCH_COMMIT_BODY": json.dumps(COMMIT_BODY),
        },
    )


def _mb(kb: list[int] | int) -> str:
    values = kb if isinstance(kb, list) else [kb]
    return ", ".join(f"{v / 1024:.0f}" for v in values) + " MB"


def report(
    result: LoadResult, marks: dict[str, Mark], ledger: dict[str, int], warm: int, waited: float
) -> str:
    c = result.counters
    before, end, after = marks["before"], marks["end"], marks["settled"]
    kept = after.used_memory - after.stream_bytes - before.used_memory + before.stream_bytes
    acked = {"committed": c["committed"] + warm, "released": c["released"]}
    unsettled = c["reserved"] - c["committed"] - c["released"]
    lines = [
        f"requests {result.requests:,} in {result.seconds:.0f} s ({result.rps:,.0f}/s), "
        f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms",
        f"answers: 2xx {c['s2xx']:,}, 4xx {c['s4xx']:,}, 5xx {c['s5xx']:,}, other "
        f"{c['other']:,}; socket errors and timeouts {result.errors:,}",
        f"reserved {c['reserved']:,}: committed {c['committed']:,}, released "
        f"{c['released']:,}, abandoned {c['abandoned']:,} (the rest: follow-ups unsent at the end)",
        f"web workers RSS: before {_mb(before.web_rss_kb)}; after {_mb(after.web_rss_kb)}",
        f"Celery worker RSS: before {_mb(before.celery_rss_kb)}; after {_mb(after.celery_rss_kb)}",
        f"Redis used_memory: before {before.used_memory / 1e6:.1f} MB, end of load "
        f"{end.used_memory / 1e6:.1f} MB, settled {after.used_memory / 1e6:.1f} MB, of which "
        f"the stream {after.stream_bytes / 1e6:.1f} MB; the rest grew "
        f"{kept / max(1, c['reserved']):,.0f} B per reservation (records kept for the retention)",
        f"stream length: end of load {end.stream_length:,}, settled {after.stream_length:,}",
        f"leases held: end of load {end.leases_held:,}, settled {after.leases_held:,} "
        f"(after {waited:.0f} s)",
        f"ledger rows: committed {ledger.get('committed', 0):,} (acknowledged "
        f"{acked['committed']:,}, {warm} of them warm-up), released "
        f"{ledger.get('released', 0):,} (acknowledged {acked['released']:,}), expired "
        f"{ledger.get('expired', 0):,} (granted and never settled: {unsettled:,}), "
        f"held {ledger.get('held', 0):,}",
        "  (requests in flight when wrk stopped, at most one per connection, were served but "
        "not counted: the ledger may have that many more)",
    ]
    return "\n".join(lines)


def soak(args: argparse.Namespace, redis_url: str, client: redis.Redis) -> None:
    from bench.run import configure, prepare_configs

    configure(10, redis_url, args.database_url)
    api_key, _ = prepare_configs([10], redis_url)
    options = ServerOptions(args.port, args.workers, "sync", 1)
    server = server_start(options, env={})
    celery = celery_start()
    try:
        url = f"http://127.0.0.1:{args.port}"
        warm = 200
        warm_up(url, api_key, warm)
        marks = {"before": mark(client, server, celery)}
        print(f"soaking for {args.minutes:g} min at {args.connections} connections ...", flush=True)
        result = load(url, api_key, args)
        marks["end"] = mark(client, server, celery)
        waited = settle(client, SETTLE_TIMEOUT_S)
        marks["settled"] = mark(client, server, celery)
    finally:
        process_stop(celery)
        server.stop()
    print()
    print(f"{options.describe()}; Celery worker with beat (solo pool); {args.database_url}")
    print(report(result, marks, ledger_counts(), warm, waited))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    wrk_require()
    redis_server = redis_server_start()
    try:
        soak(args, redis_server.url, redis_server.client())
    finally:
        redis_server.stop()


if __name__ == "__main__":
    main()
