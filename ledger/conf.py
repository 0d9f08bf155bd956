"""The ledger's settings: a Django setting of the same name wins, else the environment
variable, else the default. Read when used, never at import time."""

from __future__ import annotations

from typing import Any

import environ
from django.conf import settings

_env = environ.Env()

DEFAULTS: dict[str, int | float | str] = {
    # consumer group of the ledger on the usage stream
    "LEDGER_GROUP": "ledger",
    # entries per database transaction
    "LEDGER_BATCH_SIZE": 1000,
    # one ingest task keeps draining (and waiting for new entries) this long; beat starts one
    # every second, so a worker is always reading and the commit-to-ledger lag stays small
    "LEDGER_INGEST_SECONDS": 0.9,
    # an entry left unacknowledged this long belongs to a consumer that died: reclaim it
    "LEDGER_CLAIM_IDLE_MS": 30_000,
    # consumers idle this long with nothing pending are forgotten
    "LEDGER_CONSUMER_IDLE_MS": 86_400_000,
    # retention in days: raw usage must cover the longest calendar budget (a month)
    "LEDGER_RAW_RETENTION_DAYS": 90,
    "LEDGER_REFUSAL_RETENTION_DAYS": 14,
    "LEDGER_MINUTE_RETENTION_DAYS": 7,
    "LEDGER_HOUR_RETENTION_DAYS": 90,
    "LEDGER_DAY_RETENTION_DAYS": 1830,
    # rows ingested this long before the last rollup run are looked at again (clock skew
    # between workers, transactions that committed late)
    "LEDGER_ROLLUP_MARGIN_SECONDS": 120,
    # a lease restored by `quota rebuild` is held at least this long from the rebuild
    "LEDGER_RESTORED_LEASE_SECONDS": 60,
    # provider drift alerts: relative difference, and absolute floors below which a
    # difference is noise (a few requests in flight over midnight)
    "LEDGER_PROVIDER_DRIFT_RATIO": 0.02,
    "LEDGER_PROVIDER_DRIFT_MIN_TOKENS": 10_000,
    "LEDGER_PROVIDER_DRIFT_MIN_USD": 1.0,
    "LEDGER_PROVIDER_DRIFT_MIN_REQUESTS": 100,
}


def ledger_setting(name: str) -> Any:
    default = DEFAULTS[name]
    if hasattr(settings, name):
        return getattr(settings, name)
    cast = type(default)
    return _env.get_value(name, cast=cast, default=default)
