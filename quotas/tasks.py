from __future__ import annotations

from celery import shared_task

from quotas.reservations import leases_expire


@shared_task(ignore_result=True)
def expire_leases() -> int:
    return leases_expire()


@shared_task(ignore_result=True)
def rebalance_allotments() -> int:
    """Move shared limits' allotments toward the partitions that ask (a partitioned store)."""
    from quotas.allotments import allotments_rebalance
    from quotas.plan import plans
    from quotas.store import get_engine

    return allotments_rebalance(get_engine(), plans.get()).units
