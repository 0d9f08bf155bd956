"""Decisions spread over a Redis Cluster, against one Redis, in the same run.

    .venv/bin/python -m bench.cluster [--seconds 20] [--processes 4] [--tenants 1000]

Starts a Redis of its own and a Redis Cluster of its own (3 masters with a replica each,
tests/fakes/redis_cluster.py), every node persisted alike (AOF, fsync every second), and,
for each store in turn, a database of its own (var/bench-cluster-<store>.sqlite3)
configured with `--tenants` tenants sharing 3 pools (tenant i's feature on pool i mod 3;
per-minute limits on each pool, shared by its tenants and so split into allotments on the
cluster; a per-minute limit per feature; a monthly cost budget per tenant; every amount far
above what a run uses). Then:

* round trips: reserves and commits through the service layer, as the API makes them, each
  command sent to Redis counted (a redirected or retried command counts again); for this
  configuration and for the demo's (demo/quota.yaml, whose pool limits refuse some calls);
* throughput: `--processes` processes, each with its own client, reserve and commit straight
  into the engine (the calls compiled once, a new reservation id each) for `--seconds`;
  decisions per second, each master's share of the commands Redis ran (INFO commandstats,
  scripts' own commands included) and the Redis CPU per decision (INFO cpu of the masters;
  the replicas' is reported apart).

This machine has 2 cores shared by the load and every Redis process: the throughput shows
how decisions spread, not what a cluster of real hosts would sustain.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
POOLS = 3
HUGE = Decimal(10**12)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    p.add_argument("--seconds", type=float, default=20.0, help="length of each throughput run")
    p.add_argument("--processes", type=int, default=4, help="processes driving the engine")
    p.add_argument("--tenants", type=int, default=1000, help="tenants sharing the 3 pools")
    p.add_argument("--pairs", type=int, default=600, help="reserve+commit pairs counted")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # a child's part (see `main`)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- in a child process: one store, one configuration ---------------------------------------


def _setup(store: str) -> None:
    import django

    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    os.environ["LOG_LEVEL"] = "WARNING"
    os.environ["DATABASE_URL"] = f"sqlite:///{ROOT / 'var' / f'bench-cluster-{store}.sqlite3'}"
    django.setup()


def config_wide(tenants: int) -> None:
    """`tenants` tenants sharing 3 pools, written with the ORM (see the module's text)."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from providers.models import LanguageModel, Pool, Provider
    from quotas.models import Limit
    from quotas.store import config_version_bump
    from tenants.models import Feature, Tenant

    call_command("migrate", verbosity=0, interactive=False)
    call_command("flush", verbosity=0, interactive=False)
    owner = get_user_model().objects.create_user("bench-owner", email="owner@bench.example")
    provider = Provider.objects.create(slug="bench")
    model = LanguageModel.objects.create(
        provider=provider, name="bench-model", input_per_mtok=Decimal("0.15"),
        output_per_mtok=Decimal("0.6"),
    )  # fmt: skip
    pools = [Pool.objects.create(slug=f"pool-{i}", provider=provider) for i in range(POOLS)]
    for pool in pools:
        pool.served_models.add(model)
        for metric in ("tokens", "requests"):
            Limit.objects.create(pool=pool, metric=metric, window="minute", amount=HUGE)
    made = Tenant.objects.bulk_create(Tenant(slug=f"t{i:05d}") for i in range(tenants))
    features = Feature.objects.bulk_create(
        Feature(tenant=t, slug="chat", owner=owner, priority="standard") for t in made
    )
    for i, feature in enumerate(features):
        feature.pools.set([pools[i % POOLS]])
    Limit.objects.bulk_create(
        [
            Limit(tenant=f.tenant, feature=f, metric="tokens", window="minute", amount=HUGE)
            for f in features
        ]
        + [Limit(tenant=t, metric="cost_usd", window="month", amount=Decimal(10**6)) for t in made]
    )
    config_version_bump(2)


def config_demo() -> None:
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    call_command("flush", verbosity=0, interactive=False)
    with open(os.devnull, "w") as quiet:
        call_command("quota", "apply", str(ROOT / "demo" / "quota.yaml"), stdout=quiet)


def _callers() -> list[tuple[Any, Any]]:
    """(key, feature) of every feature, with a key of its tenant made for the benchmark."""
    from quotas.keys import api_key_create
    from quotas.plan import plans
    from tenants.models import Tenant

    secrets_ = {t.pk: api_key_create(tenant=t, name="bench").secret for t in Tenant.objects.all()}
    plans.clear()
    plan = plans.get()
    by_tenant = {k.tenant_id: k for k in plan.keys.values()}
    assert set(by_tenant) == set(secrets_)
    return [(by_tenant[f.tenant_id], f) for f in plan.features.values()]


def _counting() -> dict[str, int]:
    """Counts every command sent to Redis, by one Redis or by the cluster (each attempt)."""
    import redis
    import redis.cluster

    sent = {"n": 0}
    single = redis.Redis.execute_command
    cluster = redis.cluster.RedisCluster._execute_command

    def count_single(self: Any, *args: Any, **kw: Any) -> Any:
        sent["n"] += 1
        return single(self, *args, **kw)

    def count_cluster(self: Any, *args: Any, **kw: Any) -> Any:
        sent["n"] += 1
        return cluster(self, *args, **kw)

    redis.Redis.execute_command = count_single  # type: ignore[method-assign]
    redis.cluster.RedisCluster._execute_command = count_cluster  # type: ignore[method-assign]
    return sent


def round_trips(pairs: int) -> dict[str, float]:
    """Commands per reserve and per commit through the service layer, over `pairs` pairs
    spread over every feature (a refused reserve has no commit)."""
    from quotas.errors import QuotaError
    from quotas.reservations import (
        CommitInput,
        ReserveInput,
        reservation_commit,
        reservation_reserve,
    )

    callers = _callers()
    model = "bench-model"
    from quotas.plan import plans

    plan = plans.get()
    if not any(model in p.models for p in plan.pools):
        model = "gpt-4o-mini"
    body = {"model": model, "input_tokens": 100, "max_output_tokens": 100, "ttl_seconds": 600}
    # warm: every script loaded, every plan compiled
    for key, feature in callers[:50]:
        try:
            held = reservation_reserve(key=key, data=ReserveInput(feature=feature.slug, **body))
            reservation_commit(
                key=key, reservation_id=held.granted.reservation_id,
                data=CommitInput(input_tokens=100, output_tokens=50),
            )  # fmt: skip
        except QuotaError:
            pass
    sent = _counting()
    reserves = commits = reserve_cmds = commit_cmds = refused = 0
    for i in range(pairs):
        key, feature = callers[i % len(callers)]
        before = sent["n"]
        try:
            held = reservation_reserve(key=key, data=ReserveInput(feature=feature.slug, **body))
        except QuotaError:
            held = None
            refused += 1
        reserves += 1
        reserve_cmds += sent["n"] - before
        if held is not None:
            before = sent["n"]
            reservation_commit(
                key=key, reservation_id=held.granted.reservation_id,
                data=CommitInput(input_tokens=100, output_tokens=50),
            )  # fmt: skip
            commits += 1
            commit_cmds += sent["n"] - before
    return {
        "per_reserve": reserve_cmds / reserves,
        "per_commit": commit_cmds / max(1, commits),
        "reserves": reserves,
        "refused": refused,
    }


def _drive(out: str, seconds: float, start_at: float) -> None:
    """One load process: reserve and commit straight into the engine until the time is up."""
    _setup(os.environ["BENCH_STORE"])
    from quotas.engine import Owner, Usage
    from quotas.plan import plans
    from quotas.reservations import ReserveInput, _reserve_call
    from quotas.store import get_engine

    engine, plan = get_engine(), plans.get()
    calls = []
    for key, feature in _all_features(plan):
        pools = plan.candidate_pools(feature, "bench-model", None)
        data = ReserveInput(feature=feature.slug, model="bench-model", input_tokens=100,
                            max_output_tokens=100, ttl_seconds=600)  # fmt: skip
        calls.append(_reserve_call(plan, key, feature, pools, data, "standard", 100, "x", False))
    while time.time() < start_at:
        time.sleep(0.01)
    done, i, stop = 0, os.getpid(), time.time() + seconds
    cpu = time.process_time()
    usage = Usage(100, 50)
    while time.time() < stop:
        call = calls[i % len(calls)]
        i += 7
        rid = engine.reservation_id(call.tenant_id)
        engine.reserve(replace(call, reservation_id=rid))
        engine.commit(reservation_id=rid, owner=Owner(call.tenant_id), usage=usage,
                      version=call.version)  # fmt: skip
        done += 2
    cpu = time.process_time() - cpu
    Path(out).write_text(json.dumps({"decisions": done, "cpu": cpu}))


def _all_features(plan: Any) -> list[tuple[Any, Any]]:
    by_tenant = {k.tenant_id: k for k in plan.keys.values()}
    return [(by_tenant[f.tenant_id], f) for f in plan.features.values() if f.tenant_id in by_tenant]


def child(args: argparse.Namespace) -> None:
    store = os.environ["BENCH_STORE"]
    _setup(store)
    result: dict[str, Any] = {}
    config_demo()
    result["demo"] = round_trips(args.pairs)
    config_wide(args.tenants)
    result["wide"] = round_trips(args.pairs)
    Path(args.out).write_text(json.dumps(result))


# -- the parent: both stores, one after the other ---------------------------------------------


def _nodes_stats(ports: list[int]) -> dict[int, tuple[int, float]]:
    """Per node: commands run so far (INFO commandstats) and CPU seconds (INFO cpu)."""
    import redis

    stats = {}
    for port in ports:
        client = redis.Redis(port=port)
        commands = sum(int(v["calls"]) for v in client.info("commandstats").values())
        cpu = client.info("cpu")
        stats[port] = (commands, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]))
        client.close()
    return stats


def measure(store: str, env: dict[str, str], args: argparse.Namespace, masters: list[int],
            replicas: list[int]) -> dict[str, Any]:  # fmt: skip
    tmp = ROOT / "var" / "bench-cluster"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **env, "BENCH_STORE": store}
    out = tmp / f"{store}.json"
    subprocess.run(
        [sys.executable, "-m", "bench.cluster", "--phase", "child", "--out", str(out),
         "--tenants", str(args.tenants), "--pairs", str(args.pairs)],
        env=env, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.read_text())
    before = _nodes_stats(masters + replicas)
    start_at = time.time() + 8  # each process compiles its calls first
    outs = [tmp / f"{store}-load-{i}.json" for i in range(args.processes)]
    drive = "from bench.cluster import _drive; _drive({!r}, {}, {})"
    drivers = [
        subprocess.Popen(
            [sys.executable, "-c", drive.format(str(o), args.seconds, start_at)], env=env
        )
        for o in outs
    ]
    for driver in drivers:
        if driver.wait() != 0:
            raise SystemExit(f"a load process failed ({store})")
    after = _nodes_stats(masters + replicas)
    loads = [json.loads(o.read_text()) for o in outs]
    decisions = sum(load["decisions"] for load in loads)
    commands = {p: after[p][0] - before[p][0] for p in masters}
    total = sum(commands.values())
    result["load"] = {
        "decisions": decisions,
        "per_second": decisions / args.seconds,
        "shares": [commands[p] / total for p in masters],
        "commands": total / decisions,
        "client_cpu_us": sum(load["cpu"] for load in loads) * 1e6 / decisions,
        "redis_cpu_us": sum(after[p][1] - before[p][1] for p in masters) * 1e6 / decisions,
        "replica_cpu_us": sum(after[p][1] - before[p][1] for p in replicas) * 1e6 / decisions,
    }
    return result


def report(single: dict[str, Any], cluster: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"{args.tenants:,} tenants over {POOLS} pools; {args.processes} processes for "
        f"{args.seconds:.0f} s each; 2 cores shared by the load and every Redis",
        "",
        f"{'':<34}{'one Redis':>14}{'cluster':>14}",
    ]
    for config, name in (("demo", "demo config"), ("wide", f"{args.tenants:,} tenants")):
        for field in ("per_reserve", "per_commit"):
            label = f"round trips {field.replace('per_', 'per ')} ({name})"
            lines.append(
                f"{label:<34}{single[config][field]:>14.2f}{cluster[config][field]:>14.2f}"
            )
    s, c = single["load"], cluster["load"]
    lines += [
        f"{'decisions/s':<34}{s['per_second']:>14,.0f}{c['per_second']:>14,.0f}",
        f"{'Redis CPU per decision (us)':<34}{s['redis_cpu_us']:>14.1f}{c['redis_cpu_us']:>14.1f}",
        f"{'  replicas too (us)':<34}{'':>14}{c['replica_cpu_us']:>14.1f}",
        f"{'Redis commands per decision':<34}{s['commands']:>14.1f}{c['commands']:>14.1f}",
        f"{'client CPU per decision (us)':<34}{s['client_cpu_us']:>14.1f}"
        f"{c['client_cpu_us']:>14.1f}",
        "each master's share of the commands: "
        + ", ".join(f"{share:.1%}" for share in c["shares"]),
        f"cluster against one Redis: {c['per_second'] / s['per_second']:.2f}x the decisions/s, "
        f"{c['redis_cpu_us'] / s['redis_cpu_us']:.2f}x the Redis CPU per decision",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.phase == "child":
        child(args)
        return
    import tempfile

    from tests.fakes.redis_cluster import RedisCluster
    from tests.fakes.redis_server import RedisServer

    # one Redis persisted as each cluster node is (AOF, fsync every second)
    server = RedisServer(Path(tempfile.mkdtemp(prefix="bench-redis-")), range(7400, 7500),
                         persistent=True)  # fmt: skip
    cluster = RedisCluster()
    try:
        server.start()
        cluster.start()
        single = measure("single", {"REDIS_URL": server.url}, args, [server.port], [])
        masters = cluster.masters()
        replicas = [cluster.replica_of(m) for m in masters]
        clustered = measure(
            "cluster",
            {"REDIS_URL": server.url, "QUOTA_REDIS_CLUSTER_NODES": cluster.seeds},
            args,
            masters,
            replicas,
        )
    finally:
        cluster.stop()
        server.stop()
    print(report(single, clustered, args))


if __name__ == "__main__":
    main()
