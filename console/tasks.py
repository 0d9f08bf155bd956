"""Celery tasks of the console: thin, each calls one service. The schedule is in
config/celery.py."""

from __future__ import annotations

from celery import shared_task
from django.utils import timezone

from console.snapshot import platform_snapshot_refresh


@shared_task(ignore_result=True)
def refresh_platform_snapshot() -> int:
    """Recompute the superuser dashboard's platform-wide panels; returns the candidates."""
    return len(platform_snapshot_refresh(now=timezone.now())["closest_ids"])
