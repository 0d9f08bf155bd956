"""Reservation API throughput and latency over HTTP, against two baselines in the same run.

    .venv/bin/python -m bench [--duration 10] [--connections 32] [--features 10,100000]

The app runs under gunicorn (workers = cores by default) with the bench settings: the
product's settings plus /bench/bare (one EVALSHA of a 3-bucket token-bucket script) and
/bench/ratelimited (django-ratelimit on the same Redis). wrk drives each scenario at a fixed
number of connections (closed loop) for the peak, then open-loop at a fixed rate
(bench/wrk/openloop.lua) at half of each peak to measure p99 there. The load generator
shares the machine's cores with the server.
The benchmark starts its own Redis (so that INFO commandstats counts only its commands) and
uses databases of its own (var/bench-<features>.sqlite3, wiped at start). Each feature count
is served by a server of its own (database, Redis database and port), all running at once,
so that reserve with 10 features and with 100,000 are measured in the same interleaved rounds.
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import django

from bench.cpu import machine_busy
from bench.harness import (
    BARE,
    RATELIMITED,
    Bench,
    Runs,
    measure_half_peaks,
    measure_peaks,
    probe_baselines,
)
from bench.redisserver import redis_server_start
from bench.report import checks_text, redis_breakdown, rounds_text, table
from bench.server import ServerOptions
from bench.targets import targets
from bench.wrk import wrk_require

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=10, help="seconds per measured run")
    p.add_argument("--warmup", type=float, default=3, help="seconds of load before each run")
    p.add_argument("--fixed-duration", type=float, help="seconds per half-of-peak run")
    p.add_argument("--no-fixed", action="store_true", help="skip the half-of-peak runs")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved runs of each scenario; the median round is reported",
    )
    p.add_argument("--connections", type=int, default=32)
    p.add_argument(
        "--open-loop-connections",
        type=int,
        help="connections (one wrk thread each) of the half-of-peak runs; default 4 per worker",
    )
    p.add_argument("--wrk-threads", type=int, default=cores)
    p.add_argument("--workers", type=int, default=cores, help="gunicorn workers")
    # sync measured cheaper than gthread here: 1.3-1.7 ms of app CPU per request against
    # 1.7-1.9 (2 cores, bare view); keep-alive does not pay for the threads.
    p.add_argument("--worker-class", choices=["sync", "gthread"], default="sync")
    p.add_argument("--threads", type=int, default=4, help="threads per gthread worker")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--features", default="10,100000", help="feature counts, comma-separated")
    p.add_argument("--baseline-only", action="store_true", help="only the two baseline views")
    args = p.parse_args(argv)
    args.fixed_duration = args.fixed_duration or args.duration
    args.open_loop_connections = args.open_loop_connections or 4 * args.workers
    args.features = [int(n) for n in args.features.split(",")]
    return args


def database_url(features: int) -> str:
    return f"sqlite:///{ROOT / 'var' / f'bench-{features}.sqlite3'}"


def configure(features: int, redis_url: str, database: str | None = None) -> None:
    """Points the settings, here and in gunicorn, at the benchmark's first database (by
    default the one for `features`) and Redis."""
    os.environ.update(
        DJANGO_SETTINGS_MODULE="bench.settings",
        REDIS_URL=redis_url,
        DATABASE_URL=database or database_url(features),
        LOG_LEVEL="WARNING",
    )
    django.setup()
    logging.getLogger("httpx").setLevel(logging.WARNING)


def prepare_configs(features: list[int], redis_url: str) -> tuple[str, dict[int, dict[str, str]]]:
    """The first feature count's configuration, made here; each other count's, a copy of it
    grown to that count (by `python -m bench.grow`) with a Redis database of its own.
    Returns the API key (valid for every copy) and each server's environment, by count."""
    from bench.fixtures import config_create, database_reset, features_grow

    first, *more = features
    print(f"configuring {first:,} features ...", flush=True)
    database_reset()
    api_key = config_create()
    features_grow(first)
    envs: dict[int, dict[str, str]] = {first: {}}
    for index, count in enumerate(more, start=1):
        print(f"configuring {count:,} features ...", flush=True)
        envs[count] = {
            "DATABASE_URL": database_url(count),
            "REDIS_URL": f"{redis_url.rsplit('/', 1)[0]}/{index}",
        }
        _sqlite_copy(_sqlite_path(first), _sqlite_path(count))
        subprocess.run(
            [sys.executable, "-m", "bench.grow", str(count)],
            env={**os.environ, **envs[count]},
            check=True,
        )
    return api_key, envs


def _sqlite_copy(source: str, target: str) -> None:
    """A consistent copy of a database in WAL mode (the file alone may lack what its
    write-ahead log still holds)."""
    for stale in (target, f"{target}-wal", f"{target}-shm"):
        Path(stale).unlink(missing_ok=True)
    with sqlite3.connect(source) as original, sqlite3.connect(target) as copy:
        original.backup(copy)


def _sqlite_path(features: int) -> str:
    return database_url(features).removeprefix("sqlite:///")


def warn_if_busy() -> None:
    busy = machine_busy()
    if busy > 0.15:
        print(
            f"WARNING: the cores were {busy:.0%} busy before the run, with other work: "
            "the figures below will be low and noisy.",
            flush=True,
        )


def describe(args: argparse.Namespace) -> str:
    server = ServerOptions(args.port, args.workers, args.worker_class, args.threads).describe()
    return (
        f"{os.cpu_count()} cores; {server}; wrk {args.wrk_threads} threads x "
        f"{args.connections} connections, {args.duration:g} s per run after {args.warmup:g} s "
        f"warm-up, {args.rounds} interleaved rounds (the median reported); half-of-peak runs "
        f"open-loop (wrk, {args.open_loop_connections} connections) for "
        f"{args.fixed_duration:g} s; load generators and Redis "
        "on the same cores."
    )


def measure(bench: Bench) -> Runs:
    runs = Runs()
    try:
        bench.start()
        probe_baselines(bench)
        measure_peaks(bench, runs)
        if not bench.args.no_fixed:
            measure_half_peaks(bench, runs)
    finally:
        bench.stop()
    return runs


def print_report(args: argparse.Namespace, runs: Runs) -> None:
    print()
    print(describe(args))
    print(table(runs.rows(), runs.bare, runs.ratelimited))
    print()
    print(redis_breakdown(runs.rows()))
    if len(next(iter(runs.rounds.values()), [])) > 1:
        print()
        print(rounds_text(runs.rounds, BARE.name, RATELIMITED.name))
    if runs.first_reserve() is not None:
        print()
        print(checks_text(targets(runs)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    wrk_require()
    redis_server = redis_server_start()
    try:
        configure(args.features[0], redis_server.url)
        sizes = args.features[:1] if args.baseline_only else args.features
        api_key, envs = prepare_configs(sizes, redis_server.url)
        bench = Bench(args, api_key, redis_server.client(), redis_server.process.pid, envs)
        print(describe(args), flush=True)
        warn_if_busy()
        runs = measure(bench)
    finally:
        redis_server.stop()
    print_report(args, runs)
    if runs.missing:
        raise SystemExit(f"\nRESERVE NOT MEASURED: {runs.missing}")
