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

The same four kinds are then measured for the scripts alone: the `EVALSHA` calls of one
reserve and its commit, as the engine made them, sent again with a new reservation id each,
100 to a pipeline, and bucket3's likewise (no Python work between two calls; client CPU is
then redis-py's pipelining).

Per call (per pair for reserve+commit) it reports the `usec` of `EVALSHA` from `INFO
commandstats` deltas (the time Redis spends in the scripts, their commands included), the
Redis process CPU from `INFO cpu` deltas (also reading the request and writing the reply),
and the CPU this Python process spent per call (the service layer, the payload, redis-py).
Medians and ranges over the rounds; a ratio is the median over the rounds of the kind's
figure against the bucket3 block of the same round, so that a slow spell of a shared
machine, which moves every kind of one round, moves the ratios less than the figures.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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


class Replay:
    """The scripts alone: one reserve's and one commit's `EVALSHA` as the engine sent them,
    sent again with a new reservation id each, in pipelines."""

    PIPELINE = 100

    def __init__(self, client: redis.Redis, work: Workload) -> None:
        from quotas.store import get_engine

        scripts = get_engine().scripts
        seen: list[tuple[str, list[str], dict[str, Any]]] = []
        send = scripts.call

        def record(name: str, keys: list[str], payload: dict[str, Any]) -> Any:
            seen.append((name, list(keys), payload))
            return send(name, keys, payload)

        scripts.call = record  # type: ignore[method-assign]
        try:
            self.rid = work.reserve()
            work.commit(self.rid)
        finally:
            del scripts.call
        self.client = client
        self.calls = {
            name: (scripts.sha(name), keys, [json.dumps(payload, separators=(",", ":")).encode()])
            for name, keys, payload in seen
        }
        self.bucket3 = work.bucket3.sha
        self.bucket3_keys = len(work.bucket3_keys)
        self.bucket3_call = [*work.bucket3_keys, *work.bucket3_args]
        self.held: list[str] = []

    def _send(self, calls: Iterable[tuple[str, str]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        old = self.rid.encode()
        for name, rid in calls:
            sha, keys, args = self.calls[name]
            new = rid.encode()
            pipe.evalsha(
                sha,
                len(keys),
                *(key.replace(self.rid, rid) for key in keys),
                *(arg.replace(old, new) for arg in args),
            )
            if len(pipe) >= self.PIPELINE:
                pipe.execute()
        pipe.execute()

    def reserves(self, n: int) -> None:
        self.held = ["rsv_" + secrets.token_hex(12) for _ in range(n)]
        self._send(("reserve", rid) for rid in self.held)

    def commits(self, n: int) -> None:
        assert len(self.held) == n
        self._send(("commit", rid) for rid in self.held)
        self.held = []

    def pairs(self, n: int) -> None:
        rids = ["rsv_" + secrets.token_hex(12) for _ in range(n)]
        self._send((name, rid) for rid in rids for name in ("reserve", "commit"))

    def buckets(self, n: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for i in range(n):
            pipe.evalsha(self.bucket3, self.bucket3_keys, *self.bucket3_call)
            if (i + 1) % self.PIPELINE == 0:
                pipe.execute()
        pipe.execute()


class Decisions(Protocol):
    def reserves(self, n: int) -> None: ...
    def commits(self, n: int) -> None: ...
    def pairs(self, n: int) -> None: ...
    def buckets(self, n: int) -> None: ...


def run_rounds(client: redis.Redis, work: Decisions, args: argparse.Namespace) -> Samples:
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


def _ratio(rows: list[Sample], base: list[Sample], field: str) -> float:
    return statistics.median(
        getattr(row, field) / getattr(bucket3, field)
        for row, bucket3 in zip(rows, base, strict=True)
    )


def report(samples: Samples) -> str:
    base = samples.by_kind["bucket3"]
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
            f"{kind:<16} {_figure(script):>20} {_ratio(rows, base, 'script_us'):>9.2f} "
            f"{_figure(cpu):>20} {_ratio(rows, base, 'redis_cpu_us'):>9.2f} "
            f"{_figure(client):>20}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    server = redis_server_start()
    try:
        from bench.run import configure, prepare_configs

        database = f"sqlite:///{ROOT / 'var' / 'script_cost.sqlite3'}"
        configure(args.features, server.url, database)
        secret, _ = prepare_configs([args.features], server.url)
        client = server.client()
        work = Workload(secret)
        samples = run_rounds(client, work, args)
        replayed = run_rounds(client, Replay(client, work), args)
    finally:
        server.stop()
    print(
        f"{args.rounds} rounds of {args.block:,} calls of each kind, {args.features:,} features; "
        "median (min-max) over the rounds\n"
    )
    print("Through the service layer, one call at a time:")
    print(report(samples))
    print("\nThe scripts alone (the same calls replayed, pipelined):")
    print(report(replayed))


if __name__ == "__main__":
    main()
