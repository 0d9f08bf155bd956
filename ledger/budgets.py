"""What every calendar budget should hold, according to the ledger.

A reservation counts in the period it was reserved in (the engine debits that period's key
and settles the same key later), for every limit whose scope matches its tenant, feature,
pool and model, by its state: committed as its actual usage, held or expired as what it
reserved (an expired lease is charged in full: the call may have happened; a held one is
counted as reserved until it settles, as Redis does), released as nothing. Degraded
reservations were never in Redis and are left out. Minute buckets are not rebuilt: they
refill within a minute, and a missing bucket is a full one.

On a partitioned store a budget's counter is on its tenant's partition; a budget shared by
tenants (no tenant, no feature: split into allotments) has a counter on every partition, and
the one of partition k counts only the reservations of partition k's tenants.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from django.db.models import BigIntegerField, Case, F, Q, Sum, Value, When
from django.db.models.functions import Coalesce

from ledger.events import USAGE_COLUMNS, Row, rows_merge
from ledger.models import UsageEvent
from quotas.engine.core import KeySpace
from quotas.engine.partitions import tenant_partition
from quotas.engine.periods import periods_around
from quotas.plan import LimitInfo, Plan, features_by_id

CALENDAR_WINDOWS = ("hour", "day", "month")
KEY_GRACE_MS = 172_800_000  # reserve.lua keeps a period's key two days past its end
Scope = tuple[int | None, int | None, int | None, int | None]  # tenant, feature, pool, model


@dataclass(frozen=True)
class BudgetPeriod:
    limit: LimitInfo
    start_ms: int
    stop_ms: int
    key: str
    # a split budget's counter: (its partition, partitions), it counts that partition's tenants
    share: tuple[int, int] | None = None

    @property
    def expire_at_ms(self) -> int:
        return self.stop_ms + KEY_GRACE_MS

    def counts(self, scope: Scope) -> bool:
        """Whether a reservation of this scope is counted by this period's counter."""
        if not limit_applies(self.limit, scope):
            return False
        if self.share is None:
            return True
        tenant, (index, count) = scope[0], self.share
        return tenant is not None and tenant_partition(tenant, count) == index


def limit_partition(plan: Plan, limit: LimitInfo, count: int) -> int | None:
    """The partition that holds a limit's counters: its tenant's (a feature's limit: the
    feature's tenant's); None for a split limit (no tenant, no feature), held by every one,
    and for a feature the plan no longer has."""
    if count == 1:
        return 0
    tenant = limit.tenant_id
    if tenant is None and limit.feature_id is not None:
        feature = features_by_id(plan).get(limit.feature_id)
        tenant = feature.tenant_id if feature else None
    return None if tenant is None else tenant_partition(tenant, count)


def budget_periods_current(*, plan: Plan, keyspace: KeySpace, now_ms: int) -> list[BudgetPeriod]:
    """The current period of every calendar budget whose counter is on this partition."""
    periods = []
    for limit in plan.limits.values():
        if limit.window not in CALENDAR_WINDOWS or limit.amount is None:
            continue
        share = None
        if keyspace.count > 1:
            at = limit_partition(plan, limit, keyspace.count)
            split = limit.tenant_id is None and limit.feature_id is None
            if split:
                share = (keyspace.index, keyspace.count)
            elif at != keyspace.index:
                continue
        _, start, stop, _ = periods_around(limit.timezone, limit.window, now_ms)
        periods.append(BudgetPeriod(limit, start, stop, keyspace.period(limit.id, start), share))
    return periods


def limit_applies(limit: LimitInfo, scope: Scope) -> bool:
    tenant, feature, pool, model = scope
    return (
        limit.tenant_id in (None, tenant)
        and limit.feature_id in (None, feature)
        and limit.pool_id in (None, pool)
        and limit.model_id in (None, model)
    )


def row_amount(row: Row, metric: str) -> int:
    """Units of `metric` a reservation holds in Redis in its state."""
    state = row["state"]
    if row["degraded"] or state == "released":
        return 0
    if metric == "requests":
        return 1
    prefix = "" if state == "committed" else "reserved_"
    cost = "cost_nusd" if state == "committed" else "reserved_cost_nusd"
    in_ = row[f"{prefix}input_tokens"] or 0
    out = row[f"{prefix}output_tokens"] or 0
    amounts = {"tokens": in_ + out, "input_tokens": in_, "output_tokens": out}
    amounts["cost_usd"] = row[cost] or 0
    return amounts.get(metric, 0)


def _state_sum(actual: str, reserved: str) -> Sum:
    return Sum(
        Case(
            When(state="committed", then=Coalesce(F(actual), 0)),
            When(state__in=("held", "expired"), then=Coalesce(F(reserved), 0)),
            default=Value(0),
            output_field=BigIntegerField(),
        )
    )


def _scope_sums(start_ms: int, stop_ms: int) -> dict[Scope, dict[str, int]]:
    """Per scope (tenant, feature, pool, model), every metric summed in one grouped query."""
    rows = (
        UsageEvent.objects.filter(created_ms__gte=start_ms, created_ms__lt=stop_ms, degraded=False)
        .values_list("tenant_pk", "feature_pk", "pool_pk", "model_pk")
        .annotate(
            requests=Sum(
                Case(
                    When(~Q(state="released"), then=Value(1)),
                    default=Value(0),
                    output_field=BigIntegerField(),
                )
            ),
            input_tokens=_state_sum("input_tokens", "reserved_input_tokens"),
            output_tokens=_state_sum("output_tokens", "reserved_output_tokens"),
            cost_usd=_state_sum("cost_nusd", "reserved_cost_nusd"),
        )
    )
    sums = {}
    for tenant, feature, pool, model, requests, in_, out, cost in rows:
        sums[(tenant, feature, pool, model)] = {
            "requests": requests or 0,
            "input_tokens": in_ or 0,
            "output_tokens": out or 0,
            "tokens": (in_ or 0) + (out or 0),
            "cost_usd": cost or 0,
        }
    return sums


def ledger_budget_amounts(periods: list[BudgetPeriod]) -> dict[str, int]:
    """Each period's amount from the ledger's rows, one query per distinct period range."""
    by_range: dict[tuple[int, int], list[BudgetPeriod]] = defaultdict(list)
    for period in periods:
        by_range[(period.start_ms, period.stop_ms)].append(period)
    amounts: dict[str, int] = {}
    for (start, stop), group in by_range.items():
        sums = _scope_sums(start, stop)
        for period in group:
            limit = period.limit
            amounts[period.key] = sum(
                metrics[limit.metric] for scope, metrics in sums.items() if period.counts(scope)
            )
    return amounts


def _rows_by_rid(rids: list[str], chunk: int = 5000) -> dict[str, Row]:
    """Stored rows of some reservations, in chunks (a backlog can be long; SQLite caps the
    number of parameters of one query)."""
    rows: dict[str, Row] = {}
    for i in range(0, len(rids), chunk):
        part = UsageEvent.objects.filter(rid__in=rids[i : i + chunk]).values(*USAGE_COLUMNS)
        rows.update((row["rid"], row) for row in part)
    return rows


def _scope(row: Row) -> Scope:
    return (row["tenant_pk"], row["feature_pk"], row["pool_pk"], row["model_pk"])


def overlay_amounts(periods: list[BudgetPeriod], pending: dict[str, Row]) -> dict[str, int]:
    """What events not yet acknowledged by the ledger change in each period: each moves its
    reservation from the row the ledger has (if any) to the merged row."""
    stored = _rows_by_rid(list(pending))
    delta: dict[str, int] = defaultdict(int)
    for rid, event_row in pending.items():
        before = stored.get(rid)
        after = event_row if before is None else rows_merge(before, event_row)
        for period in periods:
            delta[period.key] += _held_in(period, after) - (
                _held_in(period, before) if before else 0
            )
    return delta


def _held_in(period: BudgetPeriod, row: Row) -> int:
    created = row["created_ms"]
    if created is None or not period.start_ms <= created < period.stop_ms:
        return 0
    if not period.counts(_scope(row)):
        return 0
    return row_amount(row, period.limit.metric)


def rows_held(pending: Iterable[Row]) -> list[Row]:
    """Reservations still held once the unacknowledged events are applied."""
    pending_by_rid = {row["rid"]: row for row in pending}
    held = {
        row["rid"]: row
        for row in UsageEvent.objects.filter(state="held", degraded=False).values(*USAGE_COLUMNS)
    }
    missing = [rid for rid in pending_by_rid if rid not in held]
    stored = _rows_by_rid(missing)
    stored.update(held)
    for rid, event_row in pending_by_rid.items():
        before = stored.get(rid)
        held[rid] = event_row if before is None else rows_merge(before, event_row)
    return [row for row in held.values() if row["state"] == "held" and not row["degraded"]]
