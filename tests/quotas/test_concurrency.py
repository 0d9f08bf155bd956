"""No over-admission under real concurrency, against the real Redis.

Many clients (threads calling the services, processes calling the engine, threads calling the
HTTP API) reserve and commit at once against overlapping hard limits. Three independent
oracles watch them, and any one of them fails the test:

* the engine's own view: a monitor (a forked process, so that the clients' GIL does not
  decide when it looks) samples every limit with `Engine.inspect` while the clients run; no
  budget or concurrency counter is ever above its amount and no minute bucket below empty;
* Redis's own books: the monitor also takes atomic snapshots (one read-only script reads every
  counter and every lease) and checks that each counter is exactly what the leases imply: a
  held or expired lease counts as reserved, a committed one as its usage, a released one as
  nothing, and the concurrency counter is the number of held leases;
* the clients' own records: every grant counts from the moment its reply arrived and every
  refund from the moment its commit was sent, a lower bound of what Redis held at each
  instant; it must stay within every amount (a minute bucket: amount + refill since the
  start), so an engine that admitted too much is caught even if its counters agreed with it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
import redis
import redis.cluster
from django.conf import settings
from django.core.servers.basehttp import WSGIRequestHandler

from quotas.engine import Conflict, Engine, Granted, Owner, Refused, ReserveCall, Settled, Usage
from quotas.engine.types import PoolOption
from quotas.errors import QuotaError
from quotas.keys import api_key_split
from quotas.plan import NANO, KeyInfo, ModelInfo, Plan, plans
from quotas.reservations import (
    CommitInput,
    Reserved,
    ReserveInput,
    get_engine,
    leases_expire,
    reservation_commit,
    reservation_release,
    reservation_reserve,
)
from tests.factories import LanguageModelFactory
from tests.fixtures import World, store_client

# Clients in other threads must see the configuration: committed, not in a test transaction.
pytestmark = pytest.mark.django_db(transaction=True)

SEED = 20261128
CLIENTS = 64
FEATURES = ("chat", "batch")
BUCKETS = ("pool_tpm", "chat_tpm", "batch_tpm")


# -- the limits ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Caps:
    """Overlapping hard limits, small enough that most requests are refused."""

    pool_tpm: int = 300_000
    chat_tpm: int = 110_000
    batch_tpm: int = 240_000
    day_tokens: int = 290_000
    month_cost: int = 95_000_000  # nano-USD: $0.095
    concurrent: int = 8

    def of(self, name: str) -> int:
        return int(getattr(self, name))


def configure(world: World, caps: Caps) -> dict[str, int]:
    """Create the limits; returns their ids by name."""
    ids = {
        "pool_tpm": world.limit(pool=world.pool, metric="tokens", amount=caps.pool_tpm),
        "chat_tpm": world.limit(feature=world.chat, metric="tokens", amount=caps.chat_tpm),
        "batch_tpm": world.limit(feature=world.batch, metric="tokens", amount=caps.batch_tpm),
        "day_tokens": world.limit(
            tenant=world.tenant, metric="tokens", window="day", amount=caps.day_tokens
        ),
        "month_cost": world.limit(
            tenant=world.tenant,
            metric="cost_usd",
            window="month",
            amount=Decimal(caps.month_cost) / NANO,
        ),
        "concurrent": world.limit(
            pool=world.pool, metric="concurrent", window="", amount=caps.concurrent
        ),
    }
    plan = plans.get()  # warm the process's plan before any client starts
    for name, limit in ids.items():
        assert plan.limits[limit.id].units(plan.limits[limit.id].amount) == caps.of(name)
    return {name: limit.id for name, limit in ids.items()}


def api_key(world: World) -> KeyInfo:
    prefix = api_key_split(world.secret)
    assert prefix is not None
    return plans.get().keys[prefix]


# -- Redis's books -------------------------------------------------------------------------

# Read-only and atomic like every engine script: the named counters (each pattern summed, so
# that a budget's periods add up), then every lease, as they are at one instant. The leases go
# back raw: decoding them here would stall Redis for everyone else.
# Each argument is one pattern per partition, separated by spaces: a limit that tenants share
# counts on every partition.
SNAPSHOT_LUA = """
local function matching(patterns)
  local keys = {}
  for pattern in string.gmatch(patterns, '%S+') do
    for _, key in ipairs(redis.call('KEYS', pattern)) do keys[#keys + 1] = key end
  end
  return keys
end
local out = {}
for i = 2, #ARGV do
  local total = 0
  for _, key in ipairs(matching(ARGV[i])) do
    total = total + tonumber(redis.call('GET', key) or '0')
  end
  out[#out + 1] = string.format('%.0f', total)
end
for _, key in ipairs(matching(ARGV[1])) do
  out[#out + 1] = redis.call('GET', key)
end
return out
"""
COUNTERS = ("day_tokens", "month_cost", "concurrent")


@dataclass(frozen=True)
class Lease:
    state: str
    reserved_tokens: int
    reserved_cost: int
    used_tokens: int  # once settled
    used_cost: int


@dataclass
class Snapshot:
    leases: dict[str, Lease]
    counters: dict[str, int]  # day_tokens and month_cost over all periods, concurrent

    def implied(self) -> dict[str, int]:
        """What the counters must be, from the leases alone: a held or expired lease counts
        as reserved, a committed one as its usage, a released one as nothing."""
        tokens = cost = held = 0
        for lease in self.leases.values():
            assert lease.state in ("held", "expired", "committed", "released"), lease
            if lease.state in ("held", "expired"):
                tokens += lease.reserved_tokens
                cost += lease.reserved_cost
                held += lease.state == "held"
            elif lease.state == "committed":
                tokens += lease.used_tokens
                cost += lease.used_cost
        return {"day_tokens": tokens, "month_cost": cost, "concurrent": held}

    def disagreements(self) -> list[str]:
        implied = self.implied()
        return [
            f"{name}: counter {self.counters[name]} but the leases say {implied[name]}"
            for name in implied
            if self.counters[name] != implied[name]
        ]


def _snapshot_reply(client: redis.Redis, patterns: list[str]) -> list[Any]:
    """SNAPSHOT_LUA on one Redis; on a cluster on every master, the counters added up and the
    leases put together (the clients' tenant decides on one partition, so on one master: its
    keys are still read at one instant)."""
    if not isinstance(client, redis.cluster.RedisCluster):
        return list(client.eval(SNAPSHOT_LUA, 0, *patterns))
    counters, leases = [0] * len(COUNTERS), []
    for node in client.get_primaries():
        reply = client.execute_command("EVAL", SNAPSHOT_LUA, 0, *patterns, target_nodes=node)
        counters = [c + int(v) for c, v in zip(counters, reply[: len(COUNTERS)], strict=True)]
        leases += reply[len(COUNTERS) :]
    return [*counters, *leases]


def snapshot(ids: dict[str, int], engine: Engine | None = None) -> Snapshot:
    engine = engine or get_engine()
    patterns = [
        " ".join(pattern for keys in engine.spaces for pattern in each(keys))
        for each in (
            lambda keys: [keys.lease_prefix + "*"],
            lambda keys: [f"{keys.prefix}p:{ids['day_tokens']}:*"],
            lambda keys: [f"{keys.prefix}p:{ids['month_cost']}:*"],
            lambda keys: [keys.concurrency(ids["concurrent"])],
        )
    ]
    reply = _snapshot_reply(engine.client, patterns)
    leases = {}
    for raw in reply[len(COUNTERS) :]:
        lease = json.loads(raw)
        used_in, _, used_out, used_cost = lease.get("u") or (0, 0, 0, 0)  # settled: its usage
        leases[lease["id"]] = Lease(
            state=lease["st"],
            reserved_tokens=int(lease["r"]["in_"]) + int(lease["r"]["out"]),
            reserved_cost=int(lease["r"]["cost"]),
            used_tokens=int(used_in) + int(used_out),
            used_cost=int(used_cost),
        )
    counters = dict(zip(COUNTERS, map(int, reply[: len(COUNTERS)]), strict=True))
    return Snapshot(leases, counters)


# -- the engine's view, sampled --------------------------------------------------------------


@dataclass
class Samples:
    count: int = 0
    snapshots: int = 0
    violations: list[str] = field(default_factory=list)
    peak: dict[str, float] = field(default_factory=dict)  # highest used / amount seen


def sample_limits(
    engine: Engine, plan: Plan, names: dict[int, str], into: Samples, tenant_id: int
) -> None:
    """One look at every limit through the engine: no budget or concurrency counter above its
    amount, no minute bucket below empty (no commit here overruns its reservation)."""
    infos = [plan.limits[limit_id] for limit_id in names]
    space = engine.tenant_space(tenant_id)  # the clients' tenant, alone on the pool
    checks = [plan.inspection_check(info, space, engine.now_ms_estimate()) for info in infos]
    for check, state in zip(checks, engine.inspect(checks, space=space), strict=True):
        name = names[check.limit_id]
        used = float(state["used"])
        if check.kind == "b":
            within = float(state["remaining"]) >= -1e-6
        else:
            within = 0 <= used <= check.cap
        if not within:
            into.violations.append(f"sample {into.count}: {name} at {state}")
        into.peak[name] = max(into.peak.get(name, 0.0), used / check.cap)
    into.count += 1


def _monitor_main(
    ids: dict[str, int], plan: Plan, spec: EngineSpec, stop: Any, report: Any, interval: float
) -> None:
    """The monitor process: its own Redis connection, sampling until told to stop."""
    samples = Samples()
    try:
        engine = engine_for(spec)
        names = {limit_id: name for name, limit_id in ids.items()}
        books_due = 0.0
        while not stop.is_set():
            sample_limits(engine, plan, names, samples, spec.tenant_id)
            if time.monotonic() >= books_due:  # Redis's books: heavier, every 20 ms or so
                samples.violations.extend(
                    f"snapshot {samples.snapshots}: {problem}"
                    for problem in snapshot(ids, engine).disagreements()
                )
                samples.snapshots += 1
                books_due = time.monotonic() + 0.02
            time.sleep(interval)
    except BaseException:
        samples.violations.append("monitor failed:\n" + traceback.format_exc())
    samples.violations = samples.violations[:20]
    report.send(samples)
    report.close()


class Monitor:
    """Samples every limit, and Redis's books, while the clients run.

    It runs in a forked process of its own, so that it samples at any instant rather than
    when 64 client threads let a monitor thread have the GIL. Start it before any client
    thread exists (a fork copies only the calling thread)."""

    def __init__(self, world: World, ids: dict[str, int], *, interval: float = 0.001) -> None:
        context = multiprocessing.get_context("fork")
        self._stop = context.Event()
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_monitor_main,
            args=(ids, plans.get(), engine_spec(world), self._stop, send, interval),
            daemon=True,
        )
        self.samples = Samples()

    def __enter__(self) -> Monitor:
        self._process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._receive.poll(20):
            self.samples = self._receive.recv()
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
        assert self.samples.count, "the monitor reported nothing"


# -- the clients -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    rid: str
    tokens: int  # input + granted output
    cost: int  # nano-USD reserved
    output_tokens: int


@dataclass(frozen=True)
class Refusal:
    code: str
    limit_id: int


class Backend(Protocol):
    def reserve(
        self, feature: str, input_tokens: int, max_out: int, min_out: int, ttl: int = 60
    ) -> Grant | Refusal: ...

    def commit(self, rid: str, input_tokens: int, cached: int, output_tokens: int) -> Any: ...

    def release(self, rid: str) -> bool: ...

    def close(self) -> None: ...


class ServiceBackend:
    """The service layer, as the API views call it."""

    def __init__(self, key: KeyInfo, model: str) -> None:
        self.key, self.model = key, model

    def reserve(
        self, feature: str, input_tokens: int, max_out: int, min_out: int, ttl: int = 60
    ) -> Grant | Refusal:
        data = ReserveInput(
            feature=feature,
            model=self.model,
            input_tokens=input_tokens,
            max_output_tokens=max_out,
            min_output_tokens=min_out,
            ttl_seconds=ttl,
        )
        try:
            outcome = reservation_reserve(key=self.key, data=data)
        except QuotaError as exc:
            if exc.code not in ("rate_limited", "budget_exhausted"):
                raise
            return Refusal(exc.code, int(exc.extra["limit"]["id"]))
        assert isinstance(outcome, Reserved), outcome
        granted = outcome.granted
        assert not granted.degraded
        return Grant(
            granted.reservation_id,
            outcome.input_tokens + granted.output_tokens,
            granted.cost_nusd,
            granted.output_tokens,
        )

    def commit(self, rid: str, input_tokens: int, cached: int, output_tokens: int) -> Any:
        data = CommitInput(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached,
            finish_reason="stop",
            body_hash=f"{input_tokens}/{cached}/{output_tokens}",
        )
        return reservation_commit(key=self.key, reservation_id=rid, data=data).result

    def release(self, rid: str) -> bool:
        """True when released; False when the lease had expired (charged as reserved)."""
        try:
            reservation_release(key=self.key, reservation_id=rid)
        except QuotaError as exc:
            if exc.code != "conflict":
                raise
            return False
        return True

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class EngineSpec:
    """Everything a process needs to call the engine: plain data compiled in the parent."""

    hash_tag: str
    partitions: int
    retention_ms: int
    stream_maxlen: int
    version: int
    tenant_id: int
    features: dict[str, tuple[int, tuple[PoolOption, ...]]]
    model: ModelInfo


def engine_spec(world: World) -> EngineSpec:
    plan = plans.get()
    engine = get_engine()
    features = {}
    for slug in FEATURES:
        feature = plan.features[(world.tenant.id, slug)]
        pools = plan.candidate_pools(feature, world.model.name, None)
        options = plan.options(
            feature,
            pools,
            world.model.name,
            feature.priority,
            engine.tenant_space(world.tenant.id),
            engine.now_ms(),
        )
        features[slug] = (feature.id, options)
    return EngineSpec(
        hash_tag=settings.QUOTA_HASH_TAG,
        partitions=len(engine.spaces),
        retention_ms=engine.retention_ms,
        stream_maxlen=engine.stream_maxlen,
        version=plan.version,
        tenant_id=world.tenant.id,
        features=features,
        model=plan.pools[0].models[world.model.name],
    )


def engine_for(spec: EngineSpec) -> Engine:
    """An engine with a connection of its own to the store (one Redis or the cluster), as a
    freshly forked process needs."""
    return Engine(
        store_client(),
        hash_tag=spec.hash_tag,
        partitions=spec.partitions,
        retention_ms=spec.retention_ms,
        stream_maxlen=spec.stream_maxlen,
    )


class EngineBackend:
    """The engine itself, with its own Redis connection (one per process)."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.engine = engine_for(spec)
        self.owner = Owner(tenant_id=spec.tenant_id)

    def reserve(
        self, feature: str, input_tokens: int, max_out: int, min_out: int, ttl: int = 60
    ) -> Grant | Refusal:
        feature_id, options = self.spec.features[feature]
        model = self.spec.model
        call = ReserveCall(
            reservation_id=self.engine.reservation_id(self.spec.tenant_id),
            version=self.spec.version,
            tenant_id=self.spec.tenant_id,
            feature_id=feature_id,
            options=options,
            input_tokens=input_tokens,
            max_output_tokens=max_out,
            min_output_tokens=min_out,
            cost_fixed=model.cost_nusd(input_tokens, 0, 0),
            cost_per_output=float(model.output_nusd),
            prices=(
                float(model.input_nusd),
                float(model.cached_input_nusd),
                float(model.output_nusd),
            ),
            ttl_ms=ttl * 1000,
            meta={"feature": feature, "model": model.name},
        )
        result = self.engine.reserve(call)
        if isinstance(result, Refused):
            return Refusal(result.reason, result.limit_id)
        assert isinstance(result, Granted), result
        return Grant(
            result.reservation_id,
            input_tokens + result.output_tokens,
            result.cost_nusd,
            result.output_tokens,
        )

    def commit(self, rid: str, input_tokens: int, cached: int, output_tokens: int) -> Any:
        usage = Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached,
            body_hash=f"{input_tokens}/{cached}/{output_tokens}",
        )
        result = self.engine.commit(
            reservation_id=rid, owner=self.owner, usage=usage, version=self.spec.version
        )
        assert isinstance(result, Settled), result
        return result.result

    def release(self, rid: str) -> bool:
        result = self.engine.release(
            reservation_id=rid, owner=self.owner, version=self.spec.version
        )
        if isinstance(result, Conflict):
            assert result.state == "expired", result
            return False
        assert isinstance(result, Settled), result
        return True

    def close(self) -> None:
        self.engine.client.close()


def nusd(usd: float) -> int:
    """The API shows USD rounded to 9 places: exactly the nano-USD the engine counts."""
    return round(usd * 1_000_000_000)


CONNECTING = threading.Semaphore(8)


def http_client(base_url: str, secret: str) -> httpx.Client:
    """A client with its connection open: the test server listens with a backlog of 10, so
    64 clients connecting at the same instant would be reset; they connect a few at a time."""
    http = httpx.Client(
        base_url=base_url,
        headers={"Authorization": f"Bearer {secret}"},
        timeout=30,
        verify=False,  # plain HTTP; and no CA bundle to load 64 times
    )
    with CONNECTING:
        assert http.get("/api/v1/reservations/rsv_none").status_code == 404
    return http


@pytest.fixture
def http_server(live_server: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any) -> str:
    """The live server, answering without the test server's Nagle delay (it writes headers
    and body separately: 40 ms per keep-alive request otherwise), and httpx not logging every
    request."""
    monkeypatch.setattr(WSGIRequestHandler, "disable_nagle_algorithm", True)
    caplog.set_level(logging.WARNING, logger="httpx")
    return str(live_server.url)


class HttpBackend:
    """The HTTP API, one connection per client."""

    def __init__(self, base_url: str, secret: str, model: str) -> None:
        self.model = model
        self.http = http_client(base_url, secret)

    def reserve(
        self, feature: str, input_tokens: int, max_out: int, min_out: int, ttl: int = 60
    ) -> Grant | Refusal:
        body = {
            "feature": feature,
            "model": self.model,
            "input_tokens": input_tokens,
            "max_output_tokens": max_out,
            "min_output_tokens": min_out,
            "ttl_seconds": ttl,
        }
        response = self.http.post("/api/v1/reservations", json=body)
        data = response.json()
        if response.status_code == 429:
            assert "Retry-After" in response.headers
            return Refusal(data["error"], int(data["limit"]["id"]))
        assert response.status_code == 201, (response.status_code, data)
        reserved = data["reserved"]
        return Grant(
            data["id"],
            reserved["input_tokens"] + reserved["output_tokens"],
            nusd(reserved["cost_usd"]),
            reserved["output_tokens"],
        )

    def commit(self, rid: str, input_tokens: int, cached: int, output_tokens: int) -> Any:
        body = {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cached_input_tokens": cached,
            "finish_reason": "stop",
        }
        response = self.http.post(f"/api/v1/reservations/{rid}/commit", json=body)
        data = response.json()
        assert response.status_code == 200, (response.status_code, data)
        assert data["usage"]["input_tokens"] == input_tokens
        assert data["usage"]["output_tokens"] == output_tokens
        return {
            "cost_nusd": nusd(data["usage"]["cost_usd"]),
            "lease_expired": data["lease_expired"],
        }

    def release(self, rid: str) -> bool:
        response = self.http.post(f"/api/v1/reservations/{rid}/release", json={})
        if response.status_code == 409:
            return False
        assert response.status_code == 200, (response.status_code, response.text)
        return True

    def close(self) -> None:
        self.http.close()


def client_loop(backend: Backend, index: int, *, iterations: int, seconds: float) -> dict[str, Any]:
    """One client: reserve a random call, hold it a moment, commit what it used (at most what
    it reserved) or release it. Returns what happened, with the time of every step."""
    rng = random.Random(f"{SEED}-{index}")
    feature = FEATURES[index % len(FEATURES)]
    deadline = time.time() + seconds
    records: list[dict[str, Any]] = []
    refusals: Counter[str] = Counter()
    refused_at: dict[str, float] = {}  # first refusal by each limit
    try:
        for _ in range(iterations):
            if time.time() > deadline:
                break
            input_tokens, max_out = rng.randint(50, 2000), rng.randint(50, 2000)
            min_out = max_out if rng.random() < 0.75 else rng.randint(50, max_out)
            outcome = backend.reserve(feature, input_tokens, max_out, min_out)
            t_grant = time.time()
            if isinstance(outcome, Refusal):
                refusals[f"{outcome.code}:{outcome.limit_id}"] += 1
                refused_at.setdefault(str(outcome.limit_id), t_grant)
                time.sleep(rng.uniform(0, 0.003))
                continue
            assert min_out <= outcome.output_tokens <= max_out
            assert outcome.tokens == input_tokens + outcome.output_tokens
            record = {
                "feature": feature,
                "rid": outcome.rid,
                "t_grant": t_grant,
                "tokens": outcome.tokens,
                "cost": outcome.cost,
            }
            time.sleep(rng.uniform(0.001, 0.01))
            if rng.random() < 0.15:
                record["t_send"] = time.time()
                assert backend.release(outcome.rid)
                record.update(action="release", used_tokens=0, used_cost=0)
            else:
                used_in = rng.randint(input_tokens // 2, input_tokens)
                cached = rng.randint(0, used_in) if rng.random() < 0.3 else 0
                used_out = rng.randint(0, outcome.output_tokens)
                record["t_send"] = time.time()
                result = backend.commit(outcome.rid, used_in, cached, used_out)
                assert not result["lease_expired"]
                record.update(
                    action="commit",
                    used_tokens=used_in + used_out,
                    used_cost=int(result["cost_nusd"]),
                )
                assert 0 <= record["used_cost"] <= record["cost"]
            record["t_done"] = time.time()
            records.append(record)
    finally:
        backend.close()
    return {"records": records, "refusals": dict(refusals), "refused_at": refused_at}


def run_threads(
    count: int,
    target: Callable[[Any], Any],
    *,
    timeout: float,
    prepare: Callable[[int], Any] | None = None,
) -> list[Any]:
    """Run `target(prepare(i))` (or `target(i)`) in `count` threads, released at once once all
    are prepared; re-raise what any of them raised."""
    results: list[Any] = [None] * count
    errors: list[str] = []
    barrier = threading.Barrier(count)

    def body(index: int) -> None:
        try:
            arg = prepare(index) if prepare else index
            barrier.wait(timeout=timeout)
            results[index] = target(arg)
        except BaseException:
            errors.append(f"client {index}:\n{traceback.format_exc()}")

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    stop_at = time.monotonic() + timeout
    for thread in threads:
        thread.join(timeout=max(0.0, stop_at - time.monotonic()))
    assert not [t for t in threads if t.is_alive()], f"clients still running after {timeout} s"
    assert not errors, errors[0]
    return results


# -- the clients' records, as a lower bound of what Redis held --------------------------------


def held_at_least(
    records: list[dict[str, Any]], caps: Caps, t0: float
) -> tuple[list[str], dict[str, float]]:
    """Replay the records in time order: a grant counts from when its reply arrived, a refund
    from when its commit was sent, a settled cost from when the reply arrived. What Redis held
    was at least this at every instant, so it must fit every amount; a minute bucket may also
    have refilled amount/60 per second since t0 (before the first reservation)."""
    events: list[tuple[float, int, dict[str, int]]] = []
    for r in records:
        bucket = f"{r['feature']}_tpm"
        refund = r["tokens"] - r["used_tokens"]
        events.append(
            (
                r["t_grant"],
                1,
                {
                    "concurrent": 1,
                    "day_tokens": r["tokens"],
                    "month_cost": r["cost"],
                    "pool_tpm": r["tokens"],
                    bucket: r["tokens"],
                },
            )
        )
        events.append(
            (
                r["t_send"],
                0,
                {
                    "concurrent": -1,
                    "day_tokens": -refund,
                    "month_cost": -r["cost"],
                    "pool_tpm": -refund,
                    bucket: -refund,
                },
            )
        )
        events.append((r["t_done"], 1, {"month_cost": r["used_cost"]}))
    events.sort(key=lambda e: (e[0], e[1]))  # at a tie, what frees goes first
    level: defaultdict[str, int] = defaultdict(int)
    peak: dict[str, float] = {}
    violations: list[str] = []
    for at, _, deltas in events:
        for name, delta in deltas.items():
            level[name] += delta
            bound = float(caps.of(name))
            if name in BUCKETS:
                bound += caps.of(name) / 60 * (at - t0 + 0.005) + 1
            if level[name] > bound:
                violations.append(
                    f"{name} held at least {level[name]} > {bound:.0f} at +{at - t0:.3f} s"
                )
            peak[name] = max(peak.get(name, 0.0), level[name] / caps.of(name))
    return violations, peak


# -- the shared checks -----------------------------------------------------------------------


@dataclass
class Run:
    records: list[dict[str, Any]]
    refusals: Counter[str]
    refused_at: dict[str, float]  # first refusal by each limit id
    elapsed: float


def gather(results: list[dict[str, Any]], elapsed: float) -> Run:
    records = [r for result in results for r in result["records"]]
    refusals: Counter[str] = Counter()
    refused_at: dict[str, float] = {}
    for result in results:
        refusals.update(result["refusals"])
        for limit_id, at in result["refused_at"].items():
            refused_at[limit_id] = min(at, refused_at.get(limit_id, at))
    return Run(records, refusals, refused_at, elapsed)


def assert_no_over_admission(
    run: Run, monitor: Monitor, ids: dict[str, int], caps: Caps, t0: float, label: str
) -> None:
    names = {str(limit_id): name for name, limit_id in ids.items()}
    by_limit: Counter[str] = Counter()
    for key, count in run.refusals.items():
        by_limit[names[key.split(":")[1]]] += count
    granted = len(run.records)
    refused = sum(by_limit.values())
    committed = [r for r in run.records if r["action"] == "commit"]

    # (a) sampled while running: never over an amount, and the books always balanced
    assert not monitor.samples.violations, monitor.samples.violations[:5]
    # (c) the clients' lower bound of what Redis held, within every amount at every instant
    violations, held_peak = held_at_least(run.records, caps, t0)
    assert not violations, violations[:5]

    # (b) at the end: every lease settled as its client said; counters exactly the usage
    final = snapshot(ids)
    assert final.counters["concurrent"] == 0
    assert not final.disagreements()
    assert {rid: lease.state for rid, lease in final.leases.items()} == {
        r["rid"]: {"commit": "committed", "release": "released"}[r["action"]] for r in run.records
    }
    for r in run.records:
        lease = final.leases[r["rid"]]
        assert (lease.reserved_tokens, lease.reserved_cost) == (r["tokens"], r["cost"])
        assert (lease.used_tokens, lease.used_cost) == (r["used_tokens"], r["used_cost"])
    used_tokens = sum(r["used_tokens"] for r in committed)
    used_cost = sum(r["used_cost"] for r in committed)
    assert final.counters["day_tokens"] == used_tokens
    assert final.counters["month_cost"] == used_cost
    assert used_tokens <= caps.day_tokens
    assert used_cost <= caps.month_cost
    # (c) over the whole run: what each bucket gave out, net of refunds
    assert used_tokens <= caps.pool_tpm * (1 + run.elapsed / 60) + 1
    for feature in FEATURES:
        spent = sum(r["used_tokens"] for r in committed if r["feature"] == feature)
        assert spent <= caps.of(f"{feature}_tpm") * (1 + run.elapsed / 60) + 1

    # the run pressed on the limits: many refusals, every slot taken at some point
    assert granted >= 30, (granted, by_limit)
    assert refused >= granted / 2, (granted, by_limit)
    assert by_limit["concurrent"] > 0, by_limit
    assert monitor.samples.count >= 20, monitor.samples.count
    first = sorted(run.refused_at.items(), key=lambda item: item[1])
    print(
        f"\n[{label}] {run.elapsed:.1f} s, {granted + refused} reserves: {granted} granted "
        f"({len(committed)} committed, {granted - len(committed)} released), {refused} "
        f"refused {dict(by_limit)} (first at "
        + ", ".join(f"{names[limit_id]} +{at - t0:.2f} s" for limit_id, at in first)
        + f"); {monitor.samples.count} samples ({monitor.samples.snapshots} snapshots), "
        f"peak used/amount sampled {_pct(monitor.samples.peak)}, from the client records "
        f"{_pct(held_peak)}; committed {used_tokens} tokens, {used_cost} nano-USD"
    )


def _pct(values: dict[str, float]) -> dict[str, str]:
    return {name: f"{value:.0%}" for name, value in sorted(values.items())}


# -- 1. the service layer, 64 threads --------------------------------------------------------


@pytest.mark.slow
def test_no_over_admission_with_64_threads_through_the_services(world: World) -> None:
    caps = Caps()
    ids = configure(world, caps)
    key = api_key(world)

    def client(index: int) -> dict[str, Any]:
        backend = ServiceBackend(key, world.model.name)
        return client_loop(backend, index, iterations=80, seconds=4)

    with Monitor(world, ids) as monitor:
        t0 = time.time()
        results = run_threads(CLIENTS, client, timeout=40)
        elapsed = time.time() - t0
    assert_no_over_admission(gather(results, elapsed), monitor, ids, caps, t0, "threads")


# -- 1b. the engine, 64 processes ------------------------------------------------------------


def _process_client(
    index: int, spec: EngineSpec, go: Any, out: str, iterations: int, seconds: float
) -> None:
    """A forked process: its own Redis connection, the plan compiled by the parent."""
    try:
        os.nice(10)  # leave the monitor and Redis their share of the cores
        backend = EngineBackend(spec)
        if not go.wait(30):
            raise RuntimeError("never told to start")
        result: dict[str, Any] = client_loop(backend, index, iterations=iterations, seconds=seconds)
    except BaseException:
        result = {"error": traceback.format_exc()}
    Path(out).write_text(json.dumps(result))


@pytest.mark.slow
def test_no_over_admission_with_64_processes_calling_the_engine(
    world: World, tmp_path: Path
) -> None:
    # the budgets bind in the thread test; here the minute buckets run dry first
    caps = Caps(pool_tpm=250_000, day_tokens=400_000, month_cost=150_000_000)
    ids = configure(world, caps)
    spec = engine_spec(world)
    context = multiprocessing.get_context("fork")
    go = context.Event()
    outputs = [tmp_path / f"client-{i}.json" for i in range(CLIENTS)]
    processes = [
        context.Process(
            target=_process_client, args=(i, spec, go, str(outputs[i]), 80, 4), daemon=True
        )
        for i in range(CLIENTS)
    ]
    for process in processes:
        process.start()
    try:
        with Monitor(world, ids) as monitor:
            t0 = time.time()
            go.set()
            stop_at = time.monotonic() + 40
            for process in processes:
                process.join(timeout=max(0.0, stop_at - time.monotonic()))
            elapsed = time.time() - t0
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    results = [json.loads(path.read_text()) for path in outputs]
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, errors[0]
    assert_no_over_admission(gather(results, elapsed), monitor, ids, caps, t0, "processes")


# -- 2. the HTTP API, 64 connections ---------------------------------------------------------


@pytest.mark.slow
def test_no_over_admission_with_64_http_clients(world: World, http_server: str) -> None:
    # HTTP in one process (server and clients share a GIL) is slower: smaller limits
    caps = Caps(
        pool_tpm=120_000,
        chat_tpm=60_000,
        batch_tpm=100_000,
        day_tokens=130_000,
        month_cost=44_000_000,
    )
    ids = configure(world, caps)

    def connect(index: int) -> tuple[int, HttpBackend]:
        return index, HttpBackend(http_server, world.secret, world.model.name)

    def client(prepared: tuple[int, HttpBackend]) -> dict[str, Any]:
        index, backend = prepared
        return client_loop(backend, index, iterations=25, seconds=5)

    with Monitor(world, ids) as monitor:
        t0 = time.time()
        results = run_threads(CLIENTS, client, timeout=60, prepare=connect)
        elapsed = time.time() - t0
    assert_no_over_admission(gather(results, elapsed), monitor, ids, caps, t0, "http")


# -- 3. one idempotency key, 32 requests at once ---------------------------------------------


@pytest.mark.slow
def test_32_simultaneous_requests_with_one_idempotency_key_reserve_once(
    world: World, http_server: str
) -> None:
    """32 connections send one body with one idempotency key at the same instant: one
    reservation, debited once, and every caller gets its id; then all 32 commit it at the
    same instant: settled once, every caller gets the same result."""
    caps = Caps(day_tokens=1_000_000, month_cost=1_000_000_000)
    ids = configure(world, caps)
    engine = get_engine()
    clients = run_threads(
        32, lambda http: http, timeout=30, prepare=lambda _: http_client(http_server, world.secret)
    )

    def at_once(path: str, body: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
        def send(http: httpx.Client) -> tuple[int, dict[str, Any]]:
            response = http.post(path, json=body)
            return response.status_code, response.json()

        return run_threads(len(clients), send, timeout=30, prepare=lambda i: clients[i])

    try:
        for round_ in range(3):
            before = snapshot(ids)
            body = {
                "feature": "chat",
                "model": world.model.name,
                "input_tokens": 700 + round_,
                "max_output_tokens": 300,
                "idempotency_key": f"race-{round_}",
            }
            replies = at_once("/api/v1/reservations", body)

            # a replay answers 200 or, as the first time, 201: either way the same reservation
            assert {status for status, _ in replies} <= {200, 201}, replies
            assert len({data["id"] for _, data in replies}) == 1
            rid = replies[0][1]["id"]
            assert all(data["status"] == "held" for _, data in replies)
            assert len({json.dumps(data["reserved"]) for _, data in replies}) == 1
            held = snapshot(ids)
            assert set(held.leases) - set(before.leases) == {rid}
            assert held.counters["concurrent"] == 1
            assert held.counters["day_tokens"] - before.counters["day_tokens"] == 1000 + round_
            cost = held.leases[rid].reserved_cost
            assert held.counters["month_cost"] - before.counters["month_cost"] == cost
            assert not held.disagreements()

            usage = {"input_tokens": 700 + round_, "output_tokens": 100}
            settled = at_once(f"/api/v1/reservations/{rid}/commit", usage)

            assert {status for status, _ in settled} == {200}, settled
            assert len({json.dumps(data, sort_keys=True) for _, data in settled}) == 1
            after = snapshot(ids)
            assert after.counters["concurrent"] == 0
            assert after.counters["day_tokens"] - before.counters["day_tokens"] == 800 + round_
            used_cost = nusd(settled[0][1]["usage"]["cost_usd"])
            assert after.counters["month_cost"] - before.counters["month_cost"] == used_cost
            assert not after.disagreements()
    finally:
        for http in clients:
            http.close()

    events = Counter(
        (fields[b"type"].decode(), fields[b"rid"].decode())
        for _, fields in engine.client.xrange(engine.tenant_space(world.tenant.id).events)
    )
    assert sorted(events.values()) == [1] * 6, events  # reserved and committed, once each
    print(f"\n[idempotency] 3 rounds x 32 simultaneous reserves and commits: {len(events)} events")


# -- 4. leases expiring while commits and the reaper race them --------------------------------


@pytest.mark.slow
def test_lease_expiry_racing_commits_and_the_reaper_settles_each_lease_once(
    world: World,
) -> None:
    threads, rounds = 40, 3
    caps = Caps(
        pool_tpm=10_000_000,
        chat_tpm=10_000_000,
        batch_tpm=10_000_000,
        day_tokens=10_000_000,
        month_cost=100_000_000_000,
        concurrent=500,
    )
    ids = configure(world, caps)
    key = api_key(world)
    backend = ServiceBackend(key, world.model.name)
    stop_reaper = threading.Event()
    reaped: list[int] = []

    def reaper() -> None:
        rng = random.Random(f"{SEED}-reaper")
        while not stop_reaper.is_set():
            reaped.append(leases_expire())
            stop_reaper.wait(rng.uniform(0, 0.01))

    def client(index: int) -> list[dict[str, Any]]:
        rng = random.Random(f"{SEED}-expiry-{index}")
        records = []
        for _ in range(rounds):
            input_tokens, max_out = rng.randint(50, 2000), rng.randint(50, 2000)
            grant = backend.reserve("chat", input_tokens, max_out, max_out, ttl=1)
            assert isinstance(grant, Grant), grant
            action = rng.choices(["commit", "release", "abandon"], [6, 2, 2])[0]
            record = {"rid": grant.rid, "grant": grant, "action": action}
            records.append(record)
            # around expiry: a lease lives 1000 ms from its reservation, in Redis's clock
            time.sleep(rng.triangular(0.5, 1.5, 1.0))
            if action == "commit":
                usage = (grant.rid, input_tokens, 0, rng.randint(0, grant.output_tokens))
                senders = 2 if rng.random() < 0.3 else 1  # now and then twice at the same time
                results = run_threads(
                    senders, lambda _, usage=usage: backend.commit(*usage), timeout=20
                )
                assert all(r == results[0] for r in results), results  # idempotent
                record.update(used=usage[1] + usage[3], result=results[0])
            elif action == "release":
                record["released"] = backend.release(grant.rid)
        return records

    thread = threading.Thread(target=reaper, daemon=True)
    with Monitor(world, ids) as monitor:
        thread.start()
        try:
            results = run_threads(threads, client, timeout=40)
            engine = get_engine()
            space = engine.tenant_space(world.tenant.id)
            give_up = time.monotonic() + 10
            while engine.client.zcard(space.leases) and time.monotonic() < give_up:
                time.sleep(0.05)  # the reaper expires the last abandoned leases
        finally:
            stop_reaper.set()
            thread.join(timeout=10)
        assert not thread.is_alive()
        leases_expire()
    assert not monitor.samples.violations, monitor.samples.violations[:5]
    records = [r for rs in results for r in rs]

    final = snapshot(ids)
    assert not final.disagreements()
    assert final.counters["concurrent"] == 0
    assert engine.client.zcard(space.leases) == 0
    events: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for _, fields in engine.client.xrange(space.events):
        events[fields[b"rid"].decode()][fields[b"type"].decode()] += 1

    expected_tokens = expected_cost = 0
    kinds: Counter[str] = Counter()
    for r in records:
        lease, grant, seen = final.leases[r["rid"]], r["grant"], events[r["rid"]]
        state = lease.state
        assert (lease.reserved_tokens, lease.reserved_cost) == (grant.tokens, grant.cost)
        assert seen["reserved"] == 1 and seen["expired"] <= 1, (r["rid"], seen)
        if r["action"] == "commit":
            late = bool(r["result"]["lease_expired"])
            kinds["committed late" if late else "committed in time"] += 1
            assert state == "committed"
            assert (lease.used_tokens, lease.used_cost) == (r["used"], r["result"]["cost_nusd"])
            assert seen["committed"] == 1 and seen["expired"] == int(late), seen
            expected_tokens += r["used"]
            expected_cost += int(r["result"]["cost_nusd"])
        elif r["action"] == "release" and r["released"]:
            kinds["released"] += 1
            assert state == "released"
            assert seen["released"] == 1 and seen["expired"] == 0, seen
        else:
            kinds["expired"] += 1
            assert state == "expired"
            assert seen["expired"] == 1 and not seen["committed"] and not seen["released"]
            expected_tokens += grant.tokens
            expected_cost += grant.cost
    assert final.counters["day_tokens"] == expected_tokens
    assert final.counters["month_cost"] == expected_cost
    assert len(final.leases) == len(records) == threads * rounds
    assert kinds["committed late"] and kinds["committed in time"] and kinds["expired"], kinds
    print(
        f"\n[expiry] {dict(kinds)}; reaper expired {sum(reaped)} in {len(reaped)} passes; "
        f"{monitor.samples.count} samples ({monitor.samples.snapshots} snapshots)"
    )


# -- found on the way: a partial grant can take one nano-USD past a hard cost limit ----------


@pytest.mark.django_db
def test_a_partial_grant_never_takes_a_cost_budget_past_its_amount(world: World) -> None:
    model = LanguageModelFactory(
        name="odd-price",
        input_per_mtok=Decimal("0.15"),  # 150 nano-USD per input token
        cached_input_per_mtok=Decimal("0.15"),
        output_per_mtok=Decimal("0.0123"),  # 12.3 nano-USD per output token
    )
    world.pool.served_models.add(model)
    budget = world.limit(
        tenant=world.tenant, metric="cost_usd", window="month", amount=Decimal("0.000132")
    )
    backend = ServiceBackend(api_key(world), model.name)

    # 19 input tokens cost 2,850; 129,150 nano-USD are left for output: exactly 10,500 tokens
    grant = backend.reserve("chat", 19, 20_000, 1)

    assert isinstance(grant, Grant)
    assert grant.output_tokens == 10_500  # the budget sized the grant
    plan, engine = plans.get(), get_engine()
    space = engine.tenant_space(world.tenant.id)
    check = plan.inspection_check(plan.limits[budget.id], space, engine.now_ms_estimate())
    assert engine.inspect([check], space=space)[0]["used"] <= check.cap  # used: 132,001 of 132,000
