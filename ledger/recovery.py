"""Rebuilding the store after it lost its data, by itself, once; and the leases of
reservations the store lost that are still committable.

Decisions stop while the store has no config version and the plan has one (see
quotas/recovery.py); the first process to see it starts `ledger.tasks.store_rebuild`. The
rebuild drains what the stream holds, then, under the ledger's row lock (so two rebuilds run
one after the other and the second finds the version written), moves every current budget
period to the ledger's amount, writes back the held leases, and writes the version: decisions
resume on the rebuilt counters. On a partitioned store only the partitions whose version is
gone are rebuilt (a shard that lost its data), each from the ledger's rows of its own tenants;
the others are left as they are.
"""

from __future__ import annotations

import dataclasses
import logging

from django.db import transaction

from ledger.conf import ledger_setting
from ledger.events import USAGE_COLUMNS
from ledger.leases import lease_for_row
from ledger.models import UsageEvent
from ledger.reconcile import BudgetReport, budgets_reconcile
from ledger.services import ledger_state_lock, usage_ingest
from quotas.allotments import allotments_restore, split_checks
from quotas.engine import Owner
from quotas.engine.types import LeaseRestore
from quotas.plan import features_by_id, plans
from quotas.recovery import REBUILD_LOCK_MS, rebuild_lock_release, rebuild_mark
from quotas.store import config_version_restore, get_engine

log = logging.getLogger(__name__)


def store_rebuild(*, force: bool = False) -> BudgetReport | None:
    """Rebuild the partitions of the store that lost their data from the ledger (all of them
    with `force`); None when there was nothing to do: every version is there, written by an
    earlier rebuild or a store that never lost it. Safe to run twice: counters move by the
    difference, leases are written only where missing."""
    usage_ingest()  # whatever the streams still hold first
    engine = get_engine()
    with transaction.atomic():
        ledger_state_lock()
        lost = [
            space for space in engine.spaces if force or not engine.client.exists(space.version)
        ]
        if not lost:
            # rebuilt already (or never lost): the locks that started this one are free again
            for space in engine.spaces:
                rebuild_lock_release(space)
            return None
        for space in lost:
            # every lost partition's lock, held until every version is back: a decision that
            # finds one partition restored and another not yet starts no second rebuild
            engine.client.set(space.rebuild_lock, "rebuild", px=REBUILD_LOCK_MS)
        report = budgets_reconcile(
            repair=True, restore_leases=True, partitions=[space.index for space in lost]
        )
        plan = plans.get()
        for space in lost:
            allotments_restore(engine, space, split_checks(plan, space, engine.now_ms_estimate()))
            rebuild_mark(space)
            config_version_restore(space)
    for space in engine.spaces:
        rebuild_lock_release(space)
    log.warning(
        "quota store rebuilt from the ledger (partitions %s of %s): %s budgets, %s moved, "
        "%s leases restored",
        ",".join(str(space.index) for space in lost),
        len(engine.spaces),
        len(report.rows),
        report.repaired,
        report.leases_restored,
    )
    return report


def lease_from_ledger(
    reservation_id: str, owner: Owner, made_before_ms: int
) -> LeaseRestore | None:
    """The lease of a reservation of the owner's made before `made_before_ms` (the store's
    last rebuild) that the ledger has as held or expired and that the store would still know
    had it not lost it (within the lease retention after its expiry); None otherwise. An
    expired one comes back expired: a commit is accepted and refunds the difference to the
    budget the rebuild charged in full."""
    row = (
        UsageEvent.objects.filter(
            rid=reservation_id,
            degraded=False,
            state__in=("held", "expired"),
            created_ms__lt=made_before_ms,
        )
        .values(*USAGE_COLUMNS)
        .first()
    )
    if row is None or row["tenant_pk"] != owner.tenant_id or row["created_ms"] is None:
        return None
    if owner.feature_ids and row["feature_pk"] not in owner.feature_ids:
        return None
    engine, plan = get_engine(), plans.get()
    if engine.reservation_space(reservation_id) is not engine.tenant_space(owner.tenant_id):
        return None  # made before the number of partitions changed: its keys are elsewhere
    now = engine.now_ms()
    granted = row["expires_ms"] or row["created_ms"]
    if granted + engine.retention_ms <= now:
        return None
    least = now + int(ledger_setting("LEDGER_RESTORED_LEASE_SECONDS") * 1000)
    held = row["state"] == "held"
    restore = lease_for_row(
        row,
        plan=plan,
        features=features_by_id(plan),
        keyspace=engine.reservation_space(reservation_id),
        expires_ms=max(least, granted) if held else granted,
    )
    if restore is None or held:
        return restore
    lease = {**restore.lease, "st": "expired", "done": now}
    return dataclasses.replace(restore, lease=lease, slots=())
