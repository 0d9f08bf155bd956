"""Redis against the ledger: the drift report, its repair, and the rebuild after Redis lost
its data.

The comparison is exact, not approximate. While it runs it holds the ledger's row lock, so no
ingest batch commits; at one instant it reads the counters and every stream entry the ledger
has not acknowledged (one script); entries in the stream are applied on top of the ledger's
rows (an entry may already be in the ledger, committed but not yet acknowledged: the merge is
idempotent). Repairs are deltas applied by one script, so a reservation made meanwhile keeps
its effect.

On a partitioned store each partition is compared on its own (its counters with the entries of
its own stream, at one instant of it) and repaired by a script on it; the held leases to write
back go to the partition their reservation id names. `partitions` limits both to some.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from django.db import transaction

from ledger.budgets import (
    BudgetPeriod,
    budget_periods_current,
    ledger_budget_amounts,
    overlay_amounts,
    rows_held,
)
from ledger.conf import ledger_setting
from ledger.events import Resolver, Row, batch_from_entries
from ledger.leases import lease_for_row
from ledger.services import ledger_state_lock
from quotas.engine.core import KeySpace
from quotas.engine.partitions import reservation_partition
from quotas.engine.types import BudgetAdjustment, LeaseRestore
from quotas.plan import features_by_id, plans
from quotas.reservations import get_engine


@dataclass(frozen=True)
class BudgetDrift:
    period: BudgetPeriod
    redis: int  # units the counter holds (0 when the key is missing)
    ledger: int  # units the ledger says it should hold

    @property
    def drift(self) -> int:
        return self.redis - self.ledger


@dataclass
class BudgetReport:
    rows: list[BudgetDrift]
    held: list[Row] = field(default_factory=list)
    repaired: int = 0
    leases_restored: int = 0
    leases_present: int = 0

    @property
    def drifted(self) -> list[BudgetDrift]:
        return [row for row in self.rows if row.drift != 0]


def budgets_reconcile(
    *,
    repair: bool = False,
    restore_leases: bool = False,
    partitions: Iterable[int] | None = None,
) -> BudgetReport:
    """Compare every calendar budget's current period with the ledger; with `repair`, move
    each counter to the ledger's amount; with `restore_leases`, also write back the leases of
    held reservations that Redis no longer has (`quota rebuild` does both). `partitions`:
    only those (by number; all by default)."""
    engine = get_engine()
    spaces = engine.spaces if partitions is None else [engine.spaces[i] for i in partitions]
    report = _budget_report(spaces, with_held=restore_leases)
    if repair or restore_leases:
        for space in spaces:
            rows = [row for row in report.rows if row.period.key.startswith(space.prefix)]
            adjustments = [
                BudgetAdjustment(row.period.key, -row.drift, row.period.expire_at_ms)
                for row in rows
                if row.drift != 0 or restore_leases
            ]
            held = [row for row in report.held if _restored_on(row) == space.index]
            leases = _leases(held, space) if restore_leases else []
            if not adjustments and not leases:
                continue
            outcome = engine.rebuild(adjustments, leases, space=space)
            report.repaired += int(outcome["adjusted"])
            report.leases_restored += int(outcome["restored"])
            report.leases_present += int(outcome["present"])
    return report


def _restored_on(row: Row) -> int | None:
    """The partition a held reservation's lease is restored on: the one its id names, where
    its settlement will look, when that is its tenant's. None when they differ (the number
    of partitions changed since it was made): no lease is restored, and the reservation,
    charged in full to its tenant's partition by the repair, expires in the ledger."""
    engine = get_engine()
    named = reservation_partition(row["rid"], len(engine.spaces))
    return named if named == engine.tenant_space(row["tenant_pk"]).index else None


def _budget_report(spaces: Sequence[KeySpace], *, with_held: bool) -> BudgetReport:
    plan, engine = plans.get(), get_engine()
    now_ms = engine.now_ms()
    group = ledger_setting("LEDGER_GROUP")
    resolver = Resolver(plan)
    by_space = [budget_periods_current(plan=plan, keyspace=s, now_ms=now_ms) for s in spaces]
    periods = [period for some in by_space for period in some]
    values: list[int | None] = []
    pending: dict[str, Row] = {}
    delta: dict[str, int] = {}
    with transaction.atomic():
        ledger_state_lock()
        for space, some in zip(spaces, by_space, strict=True):
            snapshot = engine.snapshot([p.key for p in some], group=group, space=space)
            batch = batch_from_entries(snapshot.entries, resolver, int(time.time() * 1000))
            values += snapshot.values
            # a reservation's events are all on its partition's stream, its counters too
            delta.update(overlay_amounts(some, batch.usage))
            pending.update(batch.usage)
        expected = ledger_budget_amounts(periods)
        held = rows_held(pending.values()) if with_held else []
    rows = [
        BudgetDrift(period, value or 0, expected.get(period.key, 0) + delta.get(period.key, 0))
        for period, value in zip(periods, values, strict=True)
    ]
    return BudgetReport(rows=rows, held=held)


def _leases(held: list[Row], space: KeySpace) -> list[LeaseRestore]:
    """Held until the expiry they were granted, or for LEDGER_RESTORED_LEASE_SECONDS from now
    when that is later (or unknown): a call still running keeps its lease, and one whose lease
    ran out while Redis was away still gets a moment to commit before it is charged in full."""
    plan, engine = plans.get(), get_engine()
    features = features_by_id(plan)
    least = engine.now_ms() + int(ledger_setting("LEDGER_RESTORED_LEASE_SECONDS") * 1000)
    restores = (
        lease_for_row(
            row,
            plan=plan,
            features=features,
            keyspace=space,
            expires_ms=max(least, row["expires_ms"] or 0),
        )
        for row in held
    )
    return [lease for lease in restores if lease is not None]
