"""Celery tasks of the ledger: thin, each calls one service. The schedule is in
config/celery.py."""

from __future__ import annotations

from celery import shared_task

from ledger.conf import ledger_setting
from ledger.services import usage_ingest, usage_stream_trim


@shared_task(ignore_result=True)
def ledger_ingest() -> int:
    """Drain the usage stream, then keep reading for about a second: beat starts the next."""
    return usage_ingest(max_seconds=ledger_setting("LEDGER_INGEST_SECONDS")).entries


@shared_task(ignore_result=True)
def ledger_trim_stream() -> int:
    return usage_stream_trim()
