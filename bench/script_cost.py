"""Redis CPU of one reservation decision, against the baseline script in the same run.

    .venv/bin/python -m bench.script_cost [--block 1000] [--rounds 10] [--features 10]

Starts a Redis of its own (so that `INFO commandstats` counts only this benchmark's calls)
and a database of its own (var/script_cost.sqlite3, wiped at start), configured as
`python -m bench` is (`bench/fixtures.py`: a pool with tokens and requests per minute, the
feature's tokens per minute, the tenant's monthly cost budget). Then, in rounds, one block
of calls of each kind after the other:

* reserve: `reservation_reserve` through the service layer, as the API calls it (the
  benchmark's body: 100 input tokens, 100 output, a TTL of an hour);
* commit: `reservation_commit` of the reservations the reserve block made;
* reserve+commit: a reserve and its commit, one after the other (a pair);
* bucket3: one `EVALSHA` of `bench/baseline/bucket3.lua` with the bare view's arguments.

Per call it reports `usec_per_call` of `EVALSHA` from `INFO commandstats` deltas (the time
Redis spends in the script, its commands included), the Redis process CPU from `INFO cpu`
deltas (also reading the request and writing the reply), and the CPU this Python process
spent per call (the service layer, the payload, redis-py); the ratios are against bucket3's
median. Medians and ranges over the rounds: the blocks alternate, so a slow spell of a shared
machine shows up as a range rather than in one kind only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.redisserver import redis_server_start

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("reserve", "commit", "reserve+commit", "bucket3")


@dataclass
class Sample:
    """One block of one kind: per call figures."""

    script_us: float
    redis_cpu_us: float
    client_cpu_us: float


@dataclass
class Samples:
    by_kind: dict[str, list[Sample]] = field(default_factory=lambda: {k: [] for k in KINDS})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.script_cost", description=__doc__)
    p.add_argument("--block", type=int, default=1000, help="calls per block")
    p.add_argument("--rounds", type=int, default=10, help="blocks of each kind")
    p.add_argument("--warmup", type=int, default=500, help="calls of each kind before")
    p.add_argument("--features", type=int, default=10, help="features configured")
    return p.parse_args(argv)


def _counters(client: redis.Redis) -> tuple[int, int, float]:
    """EVALSHA calls and microseconds so far, and the Redis process's CPU seconds."""
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    cpu = client.info("cpu")
    return (
        int(stats.get("calls", 0)),
        int(stats.get("usec", 0)),
        float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
    )


def measure(client: redis.Redis, calls: int, run: Callable[[], None]) -> Sample:
    """Runs `run` (which makes `calls` decisions) and returns its cost per decision."""
    evalsha0, usec0, cpu0 = _counters(client)
    client0 = time.process_time()
    run()
    client1 = time.process_time()
    evalsha1, usec1, cpu1 = _counters(client)
    scripts = evalsha1 - evalsha0
    assert scripts >= calls, f"{scripts} EVALSHA for {calls} decisions"
    return Sample(
        script_us=(usec1 - usec0) / calls,
        redis_cpu_us=(cpu1 - cpu0) * 1e6 / calls,
        client_cpu_us=(client1 - client0) * 1e6 / calls,
    )


class Workload:
    """The benchmark's decisions, through the service layer as the API makes them."""

    def __init__(self, secret: str) -> None:
        from bench.baseline.views import BUCKET_KEYS, CAPACITY, REFILL_PER_SECOND, _bucket3
        from bench.harness import COMMIT_BODY, RESERVE_BODY
        from quotas.keys import api_key_split
        from quotas.plan import plans
        from quotas.reservations import CommitInput, ReserveInput

        prefix = api_key_split(secret)
        assert prefix is not None
        self.key = plans.get().keys[prefix]
        self.reserve_input = ReserveInput(**RESERVE_BODY)  # type: ignore[arg-type]
        self.commit_input = CommitInput(**COMMIT_BODY)
        self.bucket3 = _bucket3()
        self.bucket3_keys = BUCKET_KEYS
        cost = RESERVE_BODY["input_tokens"] + RESERVE_BODY["max_output_tokens"]
        assert isinstance(cost, int)
        self.bucket3_args = [cost] + [CAPACITY, REFILL_PER_SECOND] * len(BUCKET_KEYS)
        self.held: list[str] = []

    def reserve(self) -> str:
        from quotas.reservations import reservation_reserve

        reserved = reservation_reserve(key=self.key, data=self.reserve_input)
        return reserved.granted.reservation_id

    def commit(self, reservation_id: str) -> None:
        from quotas.reservations import reservation_commit

        reservation_commit(key=self.key, reservation_id=reservation_id, data=self.commit_input)

    def reserves(self, n: int) -> None:
        self.held = [self.reserve() for _ in range(n)]

    def commits(self, n: int) -> None:
        assert len(self.held) == n
        for reservation_id in self.held:
            self.commit(reservation_id)
        self.held = []

    def pairs(self, n: int) -> None:
        for _ in range(n):
            self.commit(self.reserve())

    def buckets(self, n: int) -> None:
        for _ in range(n):
            admitted, _ = self.bucket3(keys=self.bucket3_keys, args=self.bucket3_args)
            assert admitted == 1


def run_rounds(client: redis.Redis, work: Workload, args: argparse.Namespace) -> Samples:
    work.reserves(args.warmup)
    work.commits(args.warmup)
    work.pairs(args.warmup)
    work.buckets(args.warmup)
    samples = Samples()
    n = args.block
    for _ in range(args.rounds):
        samples.by_kind["reserve"].append(measure(client, n, lambda: work.reserves(n)))
        samples.by_kind["commit"].append(measure(client, n, lambda: work.commits(n)))
        samples.by_kind["reserve+commit"].append(measure(client, n, lambda: work.pairs(n)))
        samples.by_kind["bucket3"].append(measure(client, n, lambda: work.buckets(n)))
    return samples


def _figure(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def report(samples: Samples) -> str:
    base = samples.by_kind["bucket3"]
    base_script = statistics.median(s.script_us for s in base)
    base_cpu = statistics.median(s.redis_cpu_us for s in base)
    header = (
        f"{'per call':<16} {'usec_per_call':>20} {'x bucket3':>9} "
        f"{'Redis CPU us':>20} {'x bucket3':>9} {'client CPU us':>20}"
    )
    lines = [header, "-" * len(header)]
    for kind in KINDS:
        rows = samples.by_kind[kind]
        script = [s.script_us for s in rows]
        cpu = [s.redis_cpu_us for s in rows]
        client = [s.client_cpu_us for s in rows]
        lines.append(
            f"{kind:<16} {_figure(script):>20} {statistics.median(script) / base_script:>9.2f} "
            f"{_figure(cpu):>20} {statistics.median(cpu) / base_cpu:>9.2f} "
            f"{_figure(client):>20}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    server = redis_server_start()
    try:
        from bench.run import configure, prepare_config

        configure(
            argparse.Namespace(database_url=f"sqlite:///{ROOT / 'var' / 'script_cost.sqlite3'}"),
            server.url,
        )
        secret = prepare_config(args.features)
        client = server.client()
        samples = run_rounds(client, Workload(secret), args)
    finally:
        server.stop()
    print(
        f"{args.rounds} rounds of {args.block:,} calls of each kind, {args.features:,} features; "
        "median (min-max) over the rounds"
    )
    print(report(samples))


if __name__ == "__main__":
    main()
