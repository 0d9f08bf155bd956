"""Admin pages with large data: 10,000 features and 10 million usage rollups, each page timed
in process as a superuser and as a tenant owner, against cheap admin pages measured in the
same run; and the rollup reads of `ledger.usage_reads` on the same rows.

    .venv/bin/python -m bench.admin_pages [--features 10000] [--rows 10000000] [--quick]
                                           [--keep] [--explain]

It uses its own PostgreSQL database (--database-url, default
postgres://postgres@127.0.0.1:5432/admin_bench), dropped and loaded again unless --keep finds
one loaded with the same --features and --rows less than 6 hours ago (--quick: its own
database, admin_bench_quick), and its own Redis server
(bench.redisserver) with a few live reservations. The data is described in bench.admin_load.
Pages are Django's test Client in this process, logged in with force_login: --warmup requests
first, then --requests timed ones; one more request counts the SQL queries. A page answering
404 is reported as missing (not built yet), so pages can be listed before they exist.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import django
import psycopg

from bench.admin_load import (
    OWNER,
    SUPERUSER,
    Shape,
    apply_probe,
    config_load,
    now_utc,
    rollups_load,
)
from bench.redisserver import redis_server_start
from bench.results import percentile

DEFAULT_DATABASE = "postgres://postgres@127.0.0.1:5432/admin_bench"
TARGET_MS = 300.0
QUERY_TARGET_MS = 100.0
# The data is relative to the time of the load; past this age the last 24 hours thin out.
KEEP_HOURS = 6

# The pages, in the order of the table. {feature}, {tenant} and {pool} are the ids of the
# busiest feature, its tenant and its pool (the tenant owner owns that tenant). Add pages
# here; one that answers 404 (not built yet) is reported as missing.
PAGES: list[tuple[str, str]] = [
    ("dashboard (admin index)", "/admin/"),
    ("feature change (busiest)", "/admin/tenants/feature/{feature}/change/"),
    ("feature changelist", "/admin/tenants/feature/"),
    ("tenant change", "/admin/tenants/tenant/{tenant}/change/"),
    ("pool change", "/admin/providers/pool/{pool}/change/"),
]
# Cheap pages in the same run, for the ratios: the login page (anonymous) and the password
# change form (a logged-in admin page that reads nothing but the session and the user).
BASELINES: list[tuple[str, str, str]] = [
    ("login (baseline)", "/admin/login/", "anonymous"),
    ("password change (baseline)", "/admin/password_change/", "superuser"),
]
USERS = ("superuser", "owner")


@dataclass
class PageResult:
    page: str
    user: str
    status: int
    times_ms: list[float]
    queries: int

    @property
    def missing(self) -> bool:
        return self.status == 404

    def ms(self, q: float) -> float:
        return percentile(sorted(self.times_ms), q)


# Loading


def database_prepare(url: str, keep: bool, shape: Shape, rows: int) -> dict[str, Any] | None:
    """Creates the database (dropping it first unless --keep); returns the recorded load
    when --keep finds one of the same size."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = parts._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if exists and keep:
            loaded = load_record(url)
            wanted = {"features": shape.features, "rows": rows, "tenants": shape.tenants}
            if loaded and all(loaded.get(k) == v for k, v in wanted.items()):
                age = now_utc() - datetime.fromisoformat(loaded["loaded_at"])
                if age.total_seconds() < KEEP_HOURS * 3600:
                    return loaded
                print(f"--keep: the load is over {KEEP_HOURS} h old; loading again", flush=True)
            else:
                print("--keep: no load of this size recorded; loading again", flush=True)
        if exists:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return None


def load_record(url: str) -> dict[str, Any] | None:
    with psycopg.connect(url) as conn:
        table = conn.execute("SELECT to_regclass('bench_admin_load')").fetchone()
        if not table or table[0] is None:
            return None
        row = conn.execute("SELECT details FROM bench_admin_load").fetchone()
        return dict(row[0]) if row else None


def load_save(url: str, details: dict[str, Any]) -> None:
    import json

    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_admin_load (details jsonb)")
        conn.execute("DELETE FROM bench_admin_load")
        conn.execute("INSERT INTO bench_admin_load VALUES (%s)", [json.dumps(details)])


def load(url: str, shape: Shape, rows: int, apply_features: int) -> dict[str, Any]:
    started, now = time.perf_counter(), now_utc()
    details: dict[str, Any] = {"features": shape.features, "rows": rows, "tenants": shape.tenants}
    details.update(config_load(shape, log))
    if apply_features:
        details.update(apply_probe(apply_features, log))
    details.update(rollups_load(url, shape, rows, now, log))
    details["load_seconds"] = time.perf_counter() - started
    details["loaded_at"] = now.isoformat()
    load_save(url, details)
    return details


def log(message: str) -> None:
    print(message, flush=True)


# Live state in Redis


def live_reservations(tenant: str, feature: str, model: str) -> int:
    """A few reservations of the busiest feature through the service layer: some held, some
    committed, one released."""
    from quotas.keys import api_key_create
    from quotas.plan import plans
    from quotas.reservations import (
        CommitInput,
        ReserveInput,
        reservation_commit,
        reservation_release,
        reservation_reserve,
    )
    from quotas.store import config_version_bump
    from tenants.models import Tenant

    issued = api_key_create(tenant=Tenant.objects.get(slug=tenant), name="bench")
    config_version_bump()
    plans.clear()
    key = plans.get().keys[issued.api_key.prefix]
    made = 0
    for n in range(8):
        data = ReserveInput(feature=feature, model=model, input_tokens=900, max_output_tokens=500)
        rid = reservation_reserve(key=key, data=data).granted.reservation_id
        made += 1
        if n % 4 == 1:
            reservation_release(key=key, reservation_id=rid)
        elif n % 2 == 0:
            usage = CommitInput(input_tokens=900, output_tokens=300, finish_reason="stop")
            reservation_commit(key=key, reservation_id=rid, data=usage)
    return made


# Pages


def busiest() -> dict[str, Any]:
    from tenants.models import Feature

    feature = Feature.objects.select_related("tenant").order_by("pk").first()
    assert feature is not None
    pool = feature.pools.first()
    assert pool is not None
    model = pool.served_models.order_by("pk").first()
    return {
        "feature": feature.pk,
        "tenant": feature.tenant_id,
        "pool": pool.pk,
        "tenant_slug": feature.tenant.slug,
        "feature_slug": feature.slug,
        "pool_slug": pool.slug,
        "model": model.name if model else "",
    }


def clients() -> dict[str, Any]:
    from django.contrib.auth import get_user_model
    from django.test import Client

    users = get_user_model().objects
    superuser, owner = Client(), Client()
    superuser.force_login(users.get(username=SUPERUSER))
    owner.force_login(users.get(username=OWNER))
    return {"superuser": superuser, "owner": owner, "anonymous": Client()}


def page_time(client: Any, url: str, warmup: int, requests: int) -> tuple[int, list[float], int]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    response = client.get(url)
    if response.status_code == 404:
        return 404, [], 0
    for _ in range(warmup - 1):
        client.get(url)
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - started) * 1000)
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    return response.status_code, times, len(queries)


def pages_measure(ids: dict[str, Any], warmup: int, requests: int) -> list[PageResult]:
    by_user = clients()
    results = []
    for name, url, user in BASELINES:
        results.append(PageResult(name, user, *page_time(by_user[user], url, warmup, requests)))
    for name, url in PAGES:
        for user in USERS:
            page_url = url.format(**ids)
            status, times, queries = page_time(by_user[user], page_url, warmup, requests)
            results.append(PageResult(name, user, status, times, queries))
    return results


def pages_table(results: list[PageResult]) -> str:
    base = results[0].ms(0.5) or 1.0
    width = max(28, *(len(r.page) + 1 for r in results))
    header = (
        f"{'page':<{width}} {'user':<10} {'status':>6} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} "
        f"{'queries':>7} {'x baseline':>10}  target {TARGET_MS:.0f} ms"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        if r.missing:
            lines.append(f"{r.page:<{width}} {r.user:<10} {'404':>6} {'missing':>8}")
            continue
        met = "yes" if r.ms(0.95) < TARGET_MS else "NO"
        met = met if r.status == 200 else f"{met} (HTTP {r.status})"
        lines.append(
            f"{r.page:<{width}} {r.user:<10} {r.status:>6} {r.ms(0.5):>8.1f} {r.ms(0.95):>8.1f} "
            f"{max(r.times_ms):>8.1f} {r.queries:>7} {r.ms(0.5) / base:>10.1f}  {met}"
        )
    return "\n".join(lines)


# Rollup reads


def reads(ids: dict[str, Any], tenant_slugs: list[str]) -> list[tuple[str, Callable[[], Any]]]:
    from console.snapshot import platform_snapshot_refresh
    from ledger import usage_reads

    now = now_utc()
    tenant, feature, pool = ids["tenant_slug"], ids["feature_slug"], ids["pool_slug"]
    return [
        (
            "feature_series (busiest feature)",
            lambda: usage_reads.feature_series(tenant=tenant, feature=feature, now=now),
        ),
        ("top_consumers (its pool)", lambda: usage_reads.top_consumers(pool=pool, now=now)),
        (
            "rising_truncation (all tenants)",
            lambda: usage_reads.rising_truncation(now=now, tenant_slugs=None),
        ),
        (
            "rising_truncation (owner's tenant)",
            lambda: usage_reads.rising_truncation(now=now, tenant_slugs=tenant_slugs),
        ),
        (
            "top_consumers_by_pool, all pools (beat)",
            lambda: usage_reads.top_consumers_by_pool(now=now),
        ),
        (
            "top_consumers_by_pool (owner's tenant)",
            lambda: usage_reads.top_consumers_by_pool(now=now, tenant_slugs=tenant_slugs),
        ),
        # the minutely beat task behind a superuser's dashboard (every limit read from Redis)
        ("platform snapshot refresh (beat)", lambda: platform_snapshot_refresh(now=now)),
    ]


def _size(result: Any) -> int:
    """Rows a read gave: a list's length; a feature series' hours; pools' rows together; a
    snapshot's candidate limits."""
    if isinstance(result, list):
        return len(result)
    if "hourly" in result:
        return len(result["hourly"])
    if "closest_ids" in result:
        return len(result["closest_ids"])
    return sum(len(rows) for rows in result.values())


def reads_measure(ids: dict[str, Any], requests: int, explain: bool) -> str:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    measured = list(reads(ids, [ids["tenant_slug"]]))
    width = max(36, *(len(name) + 1 for name, _ in measured))
    header = (
        f"{'rollup read':<{width}} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'queries':>7}  rows"
    )
    lines = [header, "-" * len(header)]
    plans = []
    for name, call in measured:
        for _ in range(3):
            call()
        times = []
        for _ in range(requests):
            started = time.perf_counter()
            result = call()
            times.append((time.perf_counter() - started) * 1000)
        with CaptureQueriesContext(connection) as captured:
            call()
        times.sort()
        # a beat task's work is off the page's path: no page target for it
        background = name.endswith("(beat)")
        fast = percentile(times, 0.95) < QUERY_TARGET_MS
        met = "  background" if background else "" if fast else f"  over {QUERY_TARGET_MS:.0f} ms"
        size = _size(result)
        lines.append(
            f"{name:<{width}} {percentile(times, 0.5):>8.1f} {percentile(times, 0.95):>8.1f} "
            f"{times[-1]:>8.1f} {len(captured):>7}  {size}{met}"
        )
        if explain:
            for query in captured.captured_queries:
                with connection.cursor() as cursor:
                    cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {query['sql']}")
                    plan = "\n".join(f"    {row[0]}" for row in cursor.fetchall())
                plans.append(f"{name}: {query['sql'][:300]}\n{plan}")
    return "\n".join(lines + (["", *plans] if plans else []))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.admin_pages", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--database-url", help=f"default {DEFAULT_DATABASE} ({DEFAULT_DATABASE}_quick with --quick)"
    )
    parser.add_argument("--features", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=10_000_000, help="usage rollup rows")
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--pools", type=int, default=12)
    parser.add_argument("--requests", type=int, default=20, help="timed requests per page")
    parser.add_argument("--warmup", type=int, default=3, help="requests before timing")
    parser.add_argument("--apply-features", type=int, default=100,
                        help="features of the timed `quota apply` probe (0: skip it)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="500 features, 200,000 rows, 5 requests: a smoke test")  # fmt: skip
    parser.add_argument("--keep", action="store_true",
                        help="reuse the database if it holds a load of this size")  # fmt: skip
    parser.add_argument("--explain", action="store_true",
                        help="print EXPLAIN ANALYZE of the rollup reads")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.features, args.rows, args.requests, args.apply_features = 500, 200_000, 5, 20
        args.tenants = min(args.tenants, 10)
    args.database_url = args.database_url or DEFAULT_DATABASE + ("_quick" if args.quick else "")
    shape = Shape(tenants=args.tenants, features=args.features, pools=args.pools)
    loaded = database_prepare(args.database_url, args.keep, shape, args.rows)
    server = redis_server_start()
    os.environ.update(DJANGO_SETTINGS_MODULE="config.settings", DATABASE_URL=args.database_url,
                      REDIS_URL=server.url, LOG_LEVEL="WARNING", DEBUG="false")  # fmt: skip
    try:
        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)
        if loaded is None:
            loaded = load(args.database_url, shape, args.rows, args.apply_features)
            log(f"load: {loaded['load_seconds']:.0f} s in all")
        else:
            age = (now_utc() - datetime.fromisoformat(loaded["loaded_at"])).total_seconds()
            log(
                f"--keep: reusing the load of {loaded['loaded_at'][:16]} ({age / 3600:.1f} h ago; "
                f"it took {loaded['load_seconds']:.0f} s)"
            )
        ids = busiest()
        made = live_reservations(ids["tenant_slug"], ids["feature_slug"], ids["model"])
        print(
            f"\nadmin pages: {shape.features:,} features, {loaded['rollup_rows']:,} rollup rows, "
            f"{made} live reservations; busiest feature {ids['tenant_slug']}/"
            f"{ids['feature_slug']} (id {ids['feature']}), {args.warmup} warm-ups then "
            f"{args.requests} timed requests per page ({os.cpu_count()} cores, load average "
            f"{os.getloadavg()[0]:.1f})"
        )
        print(pages_table(pages_measure(ids, args.warmup, args.requests)))
        print()
        print(reads_measure(ids, args.requests, args.explain))
        details = [
            f"load {loaded['load_seconds']:.0f} s",
            f"rollups {loaded['rollup_seconds']:.0f} s",
        ]
        if loaded.get("apply_features"):
            per = loaded["apply_seconds"] / loaded["apply_features"]
            details.append(
                f"config by bulk_create {loaded['config_seconds']:.1f} s; quota apply "
                f"{per * 1000:.0f} ms a feature (~{per * shape.features / 60:.0f} min for "
                f"{shape.features:,})"
            )
        print("load: " + ", ".join(details))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
