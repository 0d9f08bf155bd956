"""The admin benchmark's data: a platform with many tenants and features, and millions of
usage rollups, generated inside PostgreSQL (`INSERT ... SELECT ... FROM generate_series`).

Configuration rows go in with bulk_create (no history rows, no validation per row; one
feature's limits are validated with `full_clean` as a check of the shapes). The rollups:

- every feature has day rows for the last 30 days and hour rows for the last 48 hours, one
  row per model it uses (1 to 3, on its tenant's pool) and, for one feature in five, a refusal
  row (pool "", as the rollups write refusals);
- the busiest quarter of each tenant's features also has minute rows for the last hours, as
  many hours as it takes to reach the requested number of rows;
- traffic falls with a feature's rank in its tenant (100 / (1 + rank) requests a minute, with
  noise); one feature in seven truncates 3% of its commits, one in 49 of them 7.5% over the
  last 24 hours (a rise).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg

PROVIDERS = {
    "openai": ["gpt-4o-mini", "gpt-4o", "o3-mini"],
    "anthropic": ["claude-haiku", "claude-sonnet", "claude-opus"],
    "azure": ["az-gpt-4o-mini", "az-gpt-4o", "az-o3-mini"],
}
MODEL_SHARES = {1: (1.0,), 2: (0.75, 0.25), 3: (0.6, 0.3, 0.1)}
DAYS, HOURS = 30, 48
BUSY_FRACTION = 0.25
SUPERUSER, OWNER = "bench-admin", "bench-owner"
Log = Callable[[str], None]


@dataclass(frozen=True)
class Shape:
    tenants: int
    features: int
    pools: int

    @property
    def per_tenant(self) -> int:
        return math.ceil(self.features / self.tenants)

    def tenant_slug(self, i: int) -> str:
        return f"t{i:03d}"

    def feature_slug(self, rank: int) -> str:
        return f"feature-{rank:02d}"

    def pool_slug(self, p: int) -> str:
        return f"pool-{p:02d}"

    def provider_of_pool(self, p: int) -> str:
        return list(PROVIDERS)[p % len(PROVIDERS)]

    def feature(self, n: int) -> tuple[int, int, int]:
        """Feature number n: its tenant number, its rank in the tenant, its pool number."""
        tenant, rank = divmod(n, self.per_tenant)
        return tenant, rank, (tenant + rank // 50) % self.pools

    def model_count(self, n: int) -> int:
        return 1 + (n % 3 == 0) + (n % 9 == 0)

    def combos(self) -> Iterator[tuple[Any, ...]]:
        """Rows of bench_combo: every (feature, pool, model) the rollups have rows for."""
        for n in range(self.features):
            tenant, rank, pool = self.feature(n)
            models = PROVIDERS[self.provider_of_pool(pool)]
            weight = 100.0 / (1 + rank)
            busy = rank < max(1, round(self.per_tenant * BUSY_FRACTION))
            share = 0.03 if n % 7 == 0 else 0.0
            rising = n % 49 == 0
            t, f = self.tenant_slug(tenant), self.feature_slug(rank)
            count = self.model_count(n)
            for model, part in zip(models[:count], MODEL_SHARES[count], strict=True):
                yield (
                    t,
                    f,
                    self.pool_slug(pool),
                    model,
                    "usage",
                    weight * part,
                    share,
                    rising,
                    busy,
                )
            if n % 5 == 0:
                yield (t, f, "", models[0], "refusal", weight, 0.0, False, busy)


def config_load(shape: Shape, log: Log) -> dict[str, Any]:
    """Users, providers, models, pools, tenants, features and limits; returns what it made."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group

    from providers.models import LanguageModel, Pool, Provider
    from quotas.models import Limit
    from tenants.models import Feature, Tenant
    from tenants.services import OWNER_GROUP

    started = time.perf_counter()
    User = get_user_model()
    User.objects.create_superuser(SUPERUSER, "admin@bench.example", "bench")
    owner = User.objects.create_user(OWNER, "owner@bench.example", "bench", is_staff=True)
    owner.groups.add(Group.objects.get(name=OWNER_GROUP))
    people = User.objects.bulk_create(
        User(username=f"owner-{i:03d}", email=f"owner-{i:03d}@bench.example", is_staff=True)
        for i in range(shape.tenants)
    )
    providers = {slug: Provider.objects.create(slug=slug) for slug in PROVIDERS}
    models = {
        name: LanguageModel.objects.create(
            provider=providers[slug],
            name=name,
            input_per_mtok=Decimal("0.15"),
            output_per_mtok=Decimal("0.60"),
        )
        for slug, names in PROVIDERS.items()
        for name in names
    }
    pools = []
    for p in range(shape.pools):
        pool = Pool.objects.create(
            slug=shape.pool_slug(p), provider=providers[shape.provider_of_pool(p)]
        )
        pool.served_models.set([models[m] for m in PROVIDERS[shape.provider_of_pool(p)]])
        pools.append(pool)
    tenants = Tenant.objects.bulk_create(
        Tenant(slug=shape.tenant_slug(i), name=f"Tenant {i}") for i in range(shape.tenants)
    )
    Tenant.owners.through.objects.bulk_create(
        Tenant.owners.through(tenant_id=t.pk, user_id=u.pk)
        for t, u in zip(tenants, people, strict=True)
    )
    Tenant.owners.through.objects.create(tenant_id=tenants[0].pk, user_id=owner.pk)
    numbers = range(shape.features)
    features = Feature.objects.bulk_create(
        (
            Feature(
                tenant=tenants[shape.feature(n)[0]],
                slug=shape.feature_slug(shape.feature(n)[1]),
                name=f"Feature {n}",
                owner=people[shape.feature(n)[0]],
                priority="interactive" if shape.feature(n)[1] == 0 else "standard",
            )
            for n in numbers
        ),
        batch_size=2000,
    )
    Feature.pools.through.objects.bulk_create(
        (Feature.pools.through(feature_id=f.pk, pool_id=pools[shape.feature(n)[2]].pk)
         for n, f in zip(numbers, features, strict=True)),
        batch_size=5000,
    )  # fmt: skip
    limits = [
        *(Limit(pool=pool, metric="tokens", window="minute", amount=10**7) for pool in pools),
        *(Limit(pool=pool, metric="requests", window="minute", amount=10**5) for pool in pools),
        *(
            Limit(tenant=t, metric="cost_usd", window="month", amount=Decimal(50_000))
            for t in tenants
        ),
    ]
    for feature in features:
        limits += [
            Limit(tenant_id=feature.tenant_id, feature=feature, metric="tokens", window="minute",
                  amount=200_000),
            Limit(tenant_id=feature.tenant_id, feature=feature, metric="requests",
                  window="minute", amount=1_000),
            Limit(tenant_id=feature.tenant_id, feature=feature, metric="cost_usd", window="day",
                  amount=Decimal(500), enforcement="soft"),
        ]  # fmt: skip
    for limit in limits[-3:]:
        limit.full_clean()  # the shapes pass the product's own validation
    Limit.objects.bulk_create(limits, batch_size=5000)
    seconds = time.perf_counter() - started
    log(
        f"config: {shape.tenants} tenants, {len(features):,} features, {len(pools)} pools, "
        f"{len(limits):,} limits with bulk_create in {seconds:.1f} s"
    )
    return {"config_seconds": seconds, "limits": len(limits)}


def apply_probe(features: int, log: Log) -> dict[str, Any]:
    """Times `quota apply` on a tenant of `features` features with 3 limits each (then deletes
    it), to compare with bulk_create for the whole platform."""
    import tempfile
    from pathlib import Path

    from django.core.management import call_command

    from tenants.models import Tenant

    rows = [f"  - {{slug: probe-{n:04d}, owner: owner-000@bench.example}}" for n in range(features)]
    limits = [
        f"  - {{scope: {{tenant: apply-probe, feature: probe-{n:04d}}}, metric: {metric}, "
        f"window: minute, amount: 1000}}"
        for n in range(features)
        for metric in ("tokens", "requests", "input_tokens")
    ]
    text = "\n".join(
        ["tenants:", "  - slug: apply-probe", "    features:", *("  " + r for r in rows),
         "limits:", *limits, ""]
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "probe.yaml"
        path.write_text(text, encoding="utf-8")
        started = time.perf_counter()
        call_command("quota", "apply", str(path), stdout=_Null())
        seconds = time.perf_counter() - started
    Tenant.objects.filter(slug="apply-probe").delete()
    log(
        f"quota apply: {features} features with 3 limits each in {seconds:.1f} s "
        f"({seconds / features * 1000:.0f} ms a feature)"
    )
    return {"apply_features": features, "apply_seconds": seconds}


class _Null:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass


COLUMNS = (
    "grain, start, tenant, feature, pool, model, requests, input_tokens, cached_input_tokens, "
    "output_tokens, cost_nusd, refused_rate_limited, refused_budget_exhausted, "
    "refused_concurrency, truncated, upstream_429, expired, released, would_refuse, "
    "wait_histogram"
)
# One row per bucket start and combination; counters drawn around the combination's weight.
INSERT = f"""
INSERT INTO ledger_usagerollup ({COLUMNS})
SELECT %(grain)s, v.start, v.tenant, v.feature, v.pool, v.model, v.req,
       v.inp, v.inp / 5, v.outp, v.inp * 150 + v.outp * 600,
       CASE WHEN v.kind = 'refusal'
            THEN floor(v.weight * %(scale)s * 0.05 * v.r1 + v.r2) ELSE 0 END,
       CASE WHEN v.kind = 'refusal'
            THEN floor(v.weight * %(scale)s * 0.01 * v.r2 + v.r1) ELSE 0 END,
       CASE WHEN v.kind = 'refusal' THEN floor(v.r1 * 1.5) ELSE 0 END,
       floor(v.req * CASE WHEN v.rising AND v.start >= %(recent)s THEN v.share * 2.5
                          ELSE v.share END + random()),
       floor(v.req * 0.002 + random()),
       floor(v.req * 0.003 + random()),
       floor(v.req * 0.01 + random()),
       0, '{{}}'::jsonb
FROM (
    SELECT b.start, c.*, r.r1, r.r2, r.req,
           (r.req * (600 + 400 * r.r1))::bigint AS inp,
           (r.req * (150 + 300 * r.r2))::bigint AS outp
    FROM generate_series(%(first)s::timestamptz, %(last)s::timestamptz, %(step)s::interval)
         AS b(start)
    CROSS JOIN bench_combo c
    CROSS JOIN LATERAL (
        SELECT random() AS r1, random() AS r2,
               CASE WHEN c.kind = 'usage'
                    THEN round(c.weight * %(scale)s * (0.5 + random()))
                    ELSE 0 END::bigint AS req
    ) r
    WHERE c.busy OR NOT %(busy_only)s
) v
"""


def rollups_load(url: str, shape: Shape, rows: int, now: datetime, log: Log) -> dict[str, Any]:
    """Fills ledger_usagerollup with about `rows` rows (see the module's docstring)."""
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute(
            "CREATE TEMP TABLE bench_combo (tenant text, feature text, pool text, model text, "
            "kind text, weight float8, share float8, rising bool, busy bool)"
        )
        with conn.cursor().copy("COPY bench_combo FROM STDIN") as copy:
            for combo in shape.combos():
                copy.write_row(combo)
        conn.execute("ANALYZE bench_combo")
        combos, busy = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE busy) FROM bench_combo"
        ).fetchone() or (0, 0)
        minutes = max(0, (rows - combos * (DAYS + HOURS)) // max(busy, 1))
        minutes = min(minutes, 7 * 24 * 60)  # the minute grain's retention
        indexes = _secondary_indexes(conn)
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        hour = now.replace(minute=0, second=0, microsecond=0)
        day, minute = hour.replace(hour=0), now.replace(second=0, microsecond=0)
        recent = hour + timedelta(hours=1) - timedelta(hours=24)
        plan = [("day", day - timedelta(days=DAYS - 1), day, "1 day", 1440.0, False)]
        plan += _chunks(
            "hour", hour - timedelta(hours=HOURS - 1), hour, timedelta(hours=1), 12, 60.0
        )
        if minutes:
            first = minute - timedelta(minutes=minutes - 1)
            plan += _chunks("minute", first, minute, timedelta(minutes=1), 120, 1.0, busy_only=True)
        inserted = 0
        for grain, first, last, step, scale, busy_only in plan:
            cursor = conn.execute(
                INSERT,
                {"grain": grain, "first": first, "last": last, "step": step, "scale": scale,
                 "busy_only": busy_only, "recent": recent},
            )  # fmt: skip
            inserted += cursor.rowcount
            elapsed = time.perf_counter() - started
            log(f"  rollups: {inserted:,} rows ({grain} to {last:%m-%d %H:%M}), {elapsed:.0f} s")
        loaded = time.perf_counter() - started
        for name, definition in indexes:
            t = time.perf_counter()
            conn.execute(definition)
            log(f"  index {name} rebuilt in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        conn.execute("VACUUM (ANALYZE) ledger_usagerollup")
        log(f"  vacuum analyze in {time.perf_counter() - t:.1f} s")
        counts: dict[str, int] = dict(
            conn.execute("SELECT grain, count(*) FROM ledger_usagerollup GROUP BY grain").fetchall()
        )
        size = conn.execute(
            "SELECT pg_size_pretty(pg_total_relation_size('ledger_usagerollup'))"
        ).fetchone()
    seconds = time.perf_counter() - started
    total = sum(counts.values())
    log(
        f"rollups: {total:,} rows ({', '.join(f'{g} {n:,}' for g, n in sorted(counts.items()))}; "
        f"minute rows for {busy:,} busy combinations over {minutes / 60:.1f} h), "
        f"{size[0] if size else '?'}, inserted in {loaded:.0f} s, "
        f"with indexes and vacuum {seconds:.0f} s"
    )
    return {"rollup_rows": total, "rollup_seconds": seconds, "minute_hours": minutes / 60}


def _chunks(
    grain: str,
    first: datetime,
    last: datetime,
    step: timedelta,
    per_chunk: int,
    scale: float,
    *,
    busy_only: bool = False,
) -> list[tuple[str, datetime, datetime, str, float, bool]]:
    chunks = []
    interval = f"{int(step.total_seconds())} seconds"
    while first <= last:
        end = min(first + step * (per_chunk - 1), last)
        chunks.append((grain, first, end, interval, scale, busy_only))
        first = end + step
    return chunks


def _secondary_indexes(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    """The rollup table's indexes that back no constraint: dropped for the load and built
    again after it (much faster than keeping them up to date row by row)."""
    rows = conn.execute(
        """SELECT i.indexname, i.indexdef FROM pg_indexes i
           WHERE i.tablename = 'ledger_usagerollup'
             AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)"""
    ).fetchall()
    return [(name, definition) for name, definition in rows]


def now_utc() -> datetime:
    return datetime.now(UTC)
