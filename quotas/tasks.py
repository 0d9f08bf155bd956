from __future__ import annotations

from celery import shared_task

from quotas.reservations import leases_expire


@shared_task(ignore_result=True)
def expire_leases() -> int:
    return leases_expire()
