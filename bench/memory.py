"""Redis memory per reservation: held, settled, expired, per usage event and idempotency key.

    .venv/bin/python -m bench.memory [--reservations 10000] [--rate 2200]

Starts a Redis of its own and a database of its own (var/memory.sqlite3, wiped at start),
configured as `python -m bench` is (`bench/fixtures.py`: four limits on the reservation), and
makes reservations through the service layer as the API does (the benchmark's body, hashed as
the API hashes it). In phases of `--reservations` each, it reads two figures:

* `MEMORY USAGE` (every sample, `SAMPLES 0`) of the keys themselves: a lease while held, its
  record once committed, released or expired, an idempotency key, and the stream's growth per
  event;
* the `INFO memory` `used_memory` delta over the phase, per reservation: everything the phase
  left behind (keys, index entries, events, the allocator's rounding), with the stream
  trimmed before each reading so that it counts only the keys.

Then the Redis memory a given reserve rate costs per hour of `QUOTA_LEASE_RETENTION_SECONDS`.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.redisserver import redis_server_start

ROOT = Path(__file__).resolve().parent.parent
SAMPLED_KEYS = 200


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    p.add_argument("--reservations", type=int, default=10_000, help="reservations per phase")
    p.add_argument("--rate", type=float, default=2200, help="reserves per second, for the cost")
    return p.parse_args(argv)


@dataclass
class Figure:
    name: str
    key_bytes: float  # MEMORY USAGE of the key, mean over a sample
    used_bytes: float  # INFO used_memory delta per reservation (0: not measured)


class Calls:
    """Reserve, commit and release through the service layer, bodies hashed as the API does."""

    def __init__(self, secret: str) -> None:
        from bench.harness import COMMIT_BODY, RESERVE_BODY
        from quotas.keys import api_key_split
        from quotas.plan import plans
        from quotas.reservations import body_hash
        from quotas.store import get_engine

        prefix = api_key_split(secret)
        assert prefix is not None
        self.key = plans.get().keys[prefix]
        self.reserve_body: dict[str, Any] = dict(RESERVE_BODY)
        self.commit_body: dict[str, Any] = dict(COMMIT_BODY)
        self.hash = body_hash
        self.engine = get_engine()

    def reserve(self, *, ttl_seconds: int = 3600, idempotency_key: str | None = None) -> str:
        from quotas.reservations import ReserveInput, reservation_reserve

        body = {**self.reserve_body, "ttl_seconds": ttl_seconds}
        data = ReserveInput(**body, idempotency_key=idempotency_key, body_hash=self.hash(body))
        return reservation_reserve(key=self.key, data=data).granted.reservation_id

    def commit(self, rid: str) -> None:
        from quotas.reservations import CommitInput, reservation_commit

        data = CommitInput(**self.commit_body, body_hash=self.hash(self.commit_body))
        reservation_commit(key=self.key, reservation_id=rid, data=data)

    def release(self, rid: str) -> None:
        from quotas.reservations import reservation_release

        reservation_release(key=self.key, reservation_id=rid)


def used_memory(client: redis.Redis) -> int:
    client.execute_command("MEMORY", "PURGE")  # hand freed pages back, for steadier deltas
    return int(client.info("memory")["used_memory"])


def key_bytes(client: redis.Redis, keys: list[str]) -> float:
    sample = keys[:: max(1, len(keys) // SAMPLED_KEYS)]
    return statistics.fmean(int(client.memory_usage(k, samples=0) or 0) for k in sample)


@contextmanager
def used_delta(client: redis.Redis, stream: str, into: list[float]) -> Iterator[None]:
    """Appends the used_memory delta of the block, the stream emptied before each reading."""
    client.xtrim(stream, maxlen=0)
    before = used_memory(client)
    yield
    client.xtrim(stream, maxlen=0)
    into.append(used_memory(client) - before)


def measure(client: redis.Redis, calls: Calls, n: int) -> list[Figure]:
    keys = calls.engine.keys
    lease = keys.lease
    delta: list[float] = []
    with used_delta(client, keys.events, delta):
        held = [calls.reserve() for _ in range(n)]
    stream_before = int(client.memory_usage(keys.events, samples=0) or 0)
    events_before = client.xlen(keys.events)
    held_bytes = key_bytes(client, [lease(r) for r in held])
    with used_delta(client, keys.events, delta):
        for rid in held:
            calls.commit(rid)
    committed = key_bytes(client, [lease(r) for r in held])
    figures = [
        Figure("held lease (+ its index entry)", held_bytes, delta[0] / n),
        Figure("committed lease", committed, (delta[0] + delta[1]) / n),
    ]
    released = [calls.reserve() for _ in range(n)]
    for rid in released:
        calls.release(rid)
    figures.append(Figure("released lease", key_bytes(client, [lease(r) for r in released]), 0))
    figures.append(expired(client, calls, n))
    figures.append(idempotency(client, calls, n))
    stream_after = int(client.memory_usage(keys.events, samples=0) or 0)
    per_event = (stream_after - stream_before) / (client.xlen(keys.events) - events_before)
    figures.append(Figure("usage event (stream entry)", per_event, 0))
    return figures


def expired(client: redis.Redis, calls: Calls, n: int) -> Figure:
    """Leases left to expire (a one-second TTL), expired by the reaper as beat does."""
    rids = [calls.reserve(ttl_seconds=1) for _ in range(n)]
    time.sleep(1.1)
    while calls.engine.reap() > 0:
        pass
    keys = [calls.engine.keys.lease(rid) for rid in rids]
    return Figure("expired lease (abandoned)", key_bytes(client, keys), 0)


def idempotency(client: redis.Redis, calls: Calls, n: int) -> Figure:
    tenant = calls.key.tenant_id
    names = [uuid.uuid4().hex for _ in range(n)]
    for name in names:
        calls.reserve(idempotency_key=name)
    keys = [calls.engine.keys.idempotency(tenant, name) for name in names]
    return Figure("idempotency key", key_bytes(client, keys), 0)


def report(figures: list[Figure], n: int, rate: float, retention_s: int) -> str:
    lines = [
        f"{n:,} reservations per phase; bytes per item",
        "",
        f"{'':<38} {'MEMORY USAGE':>12} {'used_memory delta':>18}",
    ]
    for f in figures:
        used = f"{f.used_bytes:,.0f}" if f.used_bytes else ""
        lines.append(f"{f.name:<38} {f.key_bytes:>12,.0f} {used:>18}")
    settled = next(f for f in figures if f.name.startswith("committed"))
    per_hour = settled.used_bytes * rate * 3600
    lines += [
        "",
        f"settled reservations kept per hour of retention at {rate:,.0f} reserves/s: "
        f"{per_hour / 1e9:.2f} GB (the used_memory delta of a committed lease)",
        f"at QUOTA_LEASE_RETENTION_SECONDS={retention_s}: {per_hour * retention_s / 3600 / 1e9:.2f}"
        " GB",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    server = redis_server_start()
    try:
        from bench.run import configure, prepare_configs

        configure(10, server.url, f"sqlite:///{ROOT / 'var' / 'memory.sqlite3'}")
        secret, _ = prepare_configs([10], server.url)
        from django.conf import settings

        figures = measure(server.client(), Calls(secret), args.reservations)
        retention = settings.QUOTA_LEASE_RETENTION_SECONDS
    finally:
        server.stop()
    print(report(figures, args.reservations, args.rate, retention))


if __name__ == "__main__":
    main()
