"""Celery tasks of the alerts: thin, each calls one service. The schedule is in
config/celery.py."""

from __future__ import annotations

from celery import shared_task

from alerts.services import alerts_run


@shared_task(ignore_result=True)
def evaluate_alerts() -> int:
    """Evaluate every rule and send what changed; safe to overlap with another run."""
    return alerts_run().deliveries
