"""Celery tasks of the ledger: thin, each calls one service. The schedule is in
config/celery.py."""

from __future__ import annotations

import logging

from celery import shared_task

from ledger.conf import ledger_setting
from ledger.reconcile import budgets_reconcile
from ledger.recovery import store_rebuild
from ledger.rollups import ledger_prune, rollups_update
from ledger.services import degraded_leases_expire, usage_ingest, usage_stream_trim

log = logging.getLogger(__name__)


@shared_task(ignore_result=True)
def ledger_ingest() -> int:
    """Drain the usage stream, then keep reading for about a second: beat starts the next."""
    return usage_ingest(max_seconds=ledger_setting("LEDGER_INGEST_SECONDS")).entries


@shared_task(ignore_result=True)
def ledger_trim_stream() -> int:
    return usage_stream_trim()


@shared_task(ignore_result=True)
def ledger_expire_degraded() -> int:
    return degraded_leases_expire()


@shared_task(ignore_result=True)
def ledger_rollups() -> int:
    return rollups_update()


@shared_task(ignore_result=True)
def ledger_prune_old() -> dict[str, int]:
    return ledger_prune()


@shared_task(ignore_result=True)
def ledger_budget_drift() -> int:
    """Report drift (a warning per budget); repairing is an operator's call (`quota drift
    --repair`), since drift means something is wrong upstream of the counters."""
    drifted = budgets_reconcile().drifted
    for row in drifted:
        log.warning(
            "budget drift: limit %s key %s redis %s ledger %s",
            row.period.limit.id,
            row.period.key,
            row.redis,
            row.ledger,
        )
    return len(drifted)


@shared_task(ignore_result=True)
def ledger_store_rebuild() -> bool:
    """Started by the first process that finds the store lost its data (quotas/recovery.py);
    a second run finds the version written and does nothing."""
    return store_rebuild() is not None
