"""The scenarios and how each is measured against the running server."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import httpx
import redis

from bench.cpu import group_cpu_seconds
from bench.redisstats import command_counts, round_trips, wait_quiet
from bench.report import Row
from bench.results import LoadResult
from bench.server import Server, ServerOptions, server_start
from bench.wrk import WrkOptions, wrk_run

# Leases outlive the whole benchmark, so that no run pays for expiring an earlier run's
# uncommitted reservations (the engine expires due leases as it goes).
RESERVE_BODY = {
    "feature": "chat",
    "model": "bench-model",
    "input_tokens": 100,
    "max_output_tokens": 100,
    "ttl_seconds": 3600,
}
COMMIT_BODY = {"input_tokens": 100, "output_tokens": 50}
SAMPLE_REQUESTS = 200
PRIME_FAST_IN_A_ROW = 10
PRIME_FAST_S = 0.1
# An open-loop run that answered fewer of the requests due than this is behind: its slowest
# requests, never sent or answered, are missing from its percentiles.
ANSWERED_AT_LEAST = 0.99


class ReserveApiMissing(Exception):
    pass


@dataclass(frozen=True)
class Scenario:
    name: str
    short: str
    path: str
    script: str = "post.lua"
    # served by the server configured with this many features; None: the first configuration
    features: int | None = None

    @property
    def pairs(self) -> bool:
        return self.script == "pairs.lua"


BARE = Scenario("bare view (1 EVALSHA)", "bare", "/bench/bare")
RATELIMITED = Scenario("django-ratelimit view", "ratelimit", "/bench/ratelimited")
RESERVE = Scenario("reserve", "reserve", "/api/v1/reservations")
PAIRS = Scenario("reserve+commit", "pairs", "/api/v1/reservations", "pairs.lua")


@dataclass
class Runs:
    bare: Row | None = None
    ratelimited: Row | None = None
    reserve: dict[int, Row] = field(default_factory=dict)  # by configured feature count
    pairs: Row | None = None
    half_peak: dict[str, Row] = field(default_factory=dict)  # by scenario name
    missing: str | None = None
    # every round's row of each interleaved scenario, by the name it is reported under
    rounds: dict[str, list[Row]] = field(default_factory=dict)

    def first_reserve(self) -> Row | None:
        return next(iter(self.reserve.values()), None)

    def rows(self) -> list[Row]:
        peaks = [self.bare, self.ratelimited, self.first_reserve(), self.pairs]
        more = list(self.reserve.values())[1:] + list(self.half_peak.values())
        return [row for row in peaks + more if row is not None]


@dataclass(frozen=True)
class CpuMark:
    """CPU seconds used so far by the server's process group and by Redis."""

    app: float
    redis: float

    def per_request_ms(self, before: CpuMark, requests: int) -> tuple[float, float]:
        if not requests:
            return 0.0, 0.0
        return (
            (self.app - before.app) * 1000 / requests,
            (self.redis - before.redis) * 1000 / requests,
        )


@dataclass
class Bench:
    """The servers under test, one per configured feature count (`args.features`), each with
    its own database and Redis database (`envs`, by feature count), all running at once so
    that their scenarios can be measured in interleaved rounds."""

    args: argparse.Namespace
    api_key: str
    redis: redis.Redis
    redis_pgid: int
    envs: dict[int, dict[str, str]]
    servers: dict[int, Server] = field(default_factory=dict)

    def url(self, scenario: Scenario) -> str:
        return f"http://127.0.0.1:{self.port(self.size(scenario))}"

    def size(self, scenario: Scenario) -> int:
        """The feature count of the server that serves `scenario`."""
        return scenario.features or next(iter(self.envs))

    def port(self, features: int) -> int:
        return self.args.port + list(self.envs).index(features)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def start(self) -> None:
        a = self.args
        for features, env in self.envs.items():
            options = ServerOptions(self.port(features), a.workers, a.worker_class, a.threads)
            self.servers[features] = server_start(options, env=env)

    def stop(self) -> None:
        while self.servers:
            self.servers.popitem()[1].stop()

    def prime(self, scenario: Scenario, timeout_s: float = 300.0) -> None:
        """Sends requests one by one until ten in a row are fast, so that every worker has
        loaded what it caches (the plan of 100,000 features takes a while) before any run."""
        deadline, fast = time.monotonic() + timeout_s, 0
        with httpx.Client(
            base_url=self.url(scenario), headers=self.headers, timeout=timeout_s
        ) as c:
            while fast < PRIME_FAST_IN_A_ROW and time.monotonic() < deadline:
                started = time.monotonic()
                _send(c, scenario)
                fast = fast + 1 if time.monotonic() - started < PRIME_FAST_S else 0

    def cpu_mark(self, scenario: Scenario) -> CpuMark:
        """CPU so far of the server that serves `scenario`, and of Redis."""
        server = self.servers.get(self.size(scenario))
        app = group_cpu_seconds(server.process.pid) if server else 0.0
        return CpuMark(app=app, redis=group_cpu_seconds(self.redis_pgid))

    def closed_loop(self, scenario: Scenario, name: str | None = None, sample: bool = True) -> Row:
        """Peak throughput: wrk at a fixed number of connections, after a warm-up; `sample`:
        also count the Redis round trips of sequential requests (MONITOR)."""
        if scenario.features is not None:
            # its server sat idle since its last run and may reload its plan on the next
            # request (plans refresh after a while): not inside a measured run
            self.prime(scenario)
        if self.args.warmup:
            self._wrk(scenario, self.args.warmup)
        wait_quiet(self.redis)
        before, cpu_before = command_counts(self.redis), self.cpu_mark(scenario)
        result = self._wrk(scenario, self.args.duration)
        work = command_counts(self.redis).minus(before)
        cpu = self.cpu_mark(scenario).per_request_ms(cpu_before, result.requests)
        wait_quiet(self.redis)
        trips = self.sample_round_trips(scenario) if sample else {}
        row = Row(name or scenario.name, result, work, trips, cpu)
        counts = ", ".join(f"{name} {n:,}" for name, n in result.counters.items())
        print(
            f"  {row.name}: {result.rps:,.0f} req/s, p99 {result.p99_ms:.2f} ms"
            + (f" ({counts})" if counts else ""),
            flush=True,
        )
        return row

    def fixed_rate(self, scenario: Scenario, rate: float) -> Row:
        """Latency at a given throughput, from wrk driven open-loop (bench/wrk/openloop.lua)."""
        wait_quiet(self.redis)
        before, cpu_before = command_counts(self.redis), self.cpu_mark(scenario)
        connections = self.args.open_loop_connections
        result = self._wrk(
            scenario,
            self.args.fixed_duration,
            script="openloop.lua",
            options=WrkOptions(threads=connections, connections=connections),
            env={"BENCH_RATE": f"{rate:.3f}", "BENCH_THREADS": str(connections)},
        )
        work = command_counts(self.redis).minus(before)
        cpu = self.cpu_mark(scenario).per_request_ms(cpu_before, result.requests)
        name = f"{scenario.short} @ {rate:,.0f}/s fixed"
        due = result.counters.get("due", 0)
        if result.requests < ANSWERED_AT_LEAST * due:
            # The server (or the machine) could not keep up: latency is queueing from here on.
            name += " (behind)"
        row = Row(name, result, work, cpu_ms=cpu, closed_loop=False)
        print(
            f"  {row.name}: p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms "
            f"({result.requests:,} of {due:,} due answered)",
            flush=True,
        )
        return row

    def sample_round_trips(self, scenario: Scenario) -> dict[str, float]:
        """Redis round trips per request, from sequential requests watched with MONITOR."""
        with httpx.Client(base_url=self.url(scenario), headers=self.headers, timeout=30) as client:
            counts, requests = round_trips(
                self.redis, lambda: sum(_send(client, scenario) for _ in range(SAMPLE_REQUESTS))
            )
        return counts.per(requests)

    def _wrk(
        self,
        scenario: Scenario,
        seconds: float,
        *,
        script: str | None = None,
        options: WrkOptions | None = None,
        env: dict[str, str] | None = None,
    ) -> LoadResult:
        default = WrkOptions(threads=self.args.wrk_threads, connections=self.args.connections)
        return wrk_run(
            url=self.url(scenario) + scenario.path,
            script=script or scenario.script,
            seconds=seconds,
            options=options or default,
            env={
                "BENCH_KEY": self.api_key,
                "BENCH_BODY": json.dumps(RESERVE_BODY),
                "BENCH_COMMIT_BODY": json.dumps(COMMIT_BODY),
                **(env or {}),
            },
        )


def _send(client: httpx.Client, scenario: Scenario) -> int:
    """One request of the scenario (for pairs: a reserve and its commit); returns how many."""
    response = client.post(scenario.path, json=RESERVE_BODY)
    if not scenario.pairs:
        return 1
    client.post(f"{scenario.path}/{response.json()['id']}/commit", json=COMMIT_BODY)
    return 2


def probe_baselines(bench: Bench) -> None:
    for scenario in (BARE, RATELIMITED):
        response = httpx.post(bench.url(scenario) + scenario.path, json=RESERVE_BODY, timeout=10)
        if response.status_code != 200:
            raise SystemExit(
                f"{scenario.path} answered {response.status_code}: {response.text[:300]}"
            )


def probe_reserve(bench: Bench) -> None:
    """One reserve and its commit, so that a missing or broken API fails before any load."""
    url = bench.url(RESERVE) + RESERVE.path
    response = httpx.post(url, json=RESERVE_BODY, headers=bench.headers, timeout=30)
    if response.status_code == 404 and "json" not in response.headers.get("content-type", ""):
        raise ReserveApiMissing(
            f"POST {RESERVE.path} answered 404: the reservation API is not routed in this tree."
        )
    if response.status_code != 201:
        raise ReserveApiMissing(
            f"POST {RESERVE.path} answered {response.status_code}, not 201: {response.text[:300]}"
        )
    commit_url = f"{url}/{response.json()['id']}/commit"
    committed = httpx.post(commit_url, json=COMMIT_BODY, headers=bench.headers, timeout=30)
    if committed.status_code != 200:
        raise ReserveApiMissing(
            f"POST .../commit answered {committed.status_code}, not 200: {committed.text[:300]}"
        )


def measure_peaks(bench: Bench, runs: Runs) -> None:
    """Each scenario's peak, in interleaved rounds (bare, ratelimit, reserve, pairs, reserve
    with more features, then again): a shared machine's speed drifts over a minute by more
    than the differences measured here, so every scenario sees each stretch of it, and the
    round with the median requests/s is the one reported (`Runs.rounds` keeps them all)."""
    scenarios = [BARE, RATELIMITED]
    names = {BARE: BARE.name, RATELIMITED: RATELIMITED.name}
    first, *more = bench.args.features
    if not bench.args.baseline_only:
        try:
            probe_reserve(bench)
        except ReserveApiMissing as missing:
            runs.missing = str(missing)
        else:
            scenarios += [RESERVE, PAIRS]
            names[RESERVE] = f"reserve ({first:,} features)"
            names[PAIRS] = f"reserve+commit ({first:,} features)"
            for count in more:
                sized = replace(RESERVE, features=count)
                print(f"  priming the server with {count:,} features ...", flush=True)
                bench.prime(sized)
                scenarios.append(sized)
                names[sized] = f"reserve ({count:,} features)"
    measured = _rounds(bench, scenarios, lambda s, sample: bench.closed_loop(s, names[s], sample))
    runs.rounds.update({names[s]: rows for s, rows in measured.items()})
    runs.bare, runs.ratelimited = _median(measured[BARE]), _median(measured[RATELIMITED])
    if RESERVE in measured:
        runs.reserve[first] = _median(measured[RESERVE])
        runs.pairs = _median(measured[PAIRS])
        for count in more:
            runs.reserve[count] = _median(measured[replace(RESERVE, features=count)])


def measure_half_peaks(bench: Bench, runs: Runs) -> None:
    """Latency at half of each peak, in interleaved rounds too; the round with the median
    p99 is reported."""
    peaks = {BARE: runs.bare, RATELIMITED: runs.ratelimited, RESERVE: runs.first_reserve()}
    rates = {s: peak.result.rps / 2 for s, peak in peaks.items() if peak is not None}
    measured = _rounds(bench, list(rates), lambda s, _: bench.fixed_rate(s, rates[s]))
    for scenario, rows in measured.items():
        runs.half_peak[scenario.name] = _median(rows, key=lambda row: row.result.p99_ms)


def _rounds(
    bench: Bench, scenarios: list[Scenario], measure: Callable[[Scenario, bool], Row]
) -> dict[Scenario, list[Row]]:
    rounds = max(1, bench.args.rounds)
    measured: dict[Scenario, list[Row]] = {s: [] for s in scenarios}
    for n in range(rounds):
        if rounds > 1:
            print(f"  round {n + 1} of {rounds}", flush=True)
        for scenario in scenarios:
            measured[scenario].append(measure(scenario, n == 0))
    return measured


def _median(rows: list[Row], key: Callable[[Row], float] = lambda row: row.result.rps) -> Row:
    """The row of the median round (the lower middle of an even count), carrying the first
    round's sample of Redis round trips."""
    row = sorted(rows, key=key)[(len(rows) - 1) // 2]
    return replace(row, trips=rows[0].trips) if rows[0].trips else row
