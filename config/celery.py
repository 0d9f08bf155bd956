from __future__ import annotations

import logging.config
import os
from typing import Any

from celery import Celery
from celery.signals import setup_logging, task_failure
from prometheus_client import Counter

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

TASK_FAILURES = Counter(
    "quota_celery_task_failures", "Celery tasks that ended in an exception, by task.", ["task"]
)

app = Celery("quota")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# The beat schedule lives here and nowhere else.
app.conf.beat_schedule = {
    "expire-leases": {"task": "quotas.tasks.expire_leases", "schedule": 2.0},
    # each run drains and then keeps reading for ~0.9 s; a run still queued after a second
    # is dropped, the next one does its work
    "ledger-ingest": {
        "task": "ledger.tasks.ledger_ingest",
        "schedule": 1.0,
        "options": {"expires": 1.0},
    },
    "ledger-trim-stream": {"task": "ledger.tasks.ledger_trim_stream", "schedule": 60.0},
    "ledger-expire-degraded": {"task": "ledger.tasks.ledger_expire_degraded", "schedule": 30.0},
    "ledger-rollups": {"task": "ledger.tasks.ledger_rollups", "schedule": 30.0},
    "ledger-budget-drift": {"task": "ledger.tasks.ledger_budget_drift", "schedule": 600.0},
    "ledger-prune": {"task": "ledger.tasks.ledger_prune_old", "schedule": 3600.0},
    "evaluate-alerts": {"task": "alerts.tasks.evaluate_alerts", "schedule": 60.0},
    "console-platform-snapshot": {
        "task": "console.tasks.refresh_platform_snapshot",
        "schedule": 60.0,
        "options": {"expires": 60.0},
    },
}


@app.on_after_configure.connect
def rebalance_schedule(sender: Celery, **kwargs: Any) -> None:
    """A partitioned store's shared limits follow demand every QUOTA_REBALANCE_SECONDS
    (nothing to do on one Redis); read once the settings are, not while they load."""
    from django.conf import settings

    every = settings.QUOTA_REBALANCE_SECONDS
    sender.conf.beat_schedule["rebalance-allotments"] = {
        "task": "quotas.tasks.rebalance_allotments",
        "schedule": every,
        "options": {"expires": every},
    }


@task_failure.connect
def count_task_failure(sender: Any = None, **kwargs: Any) -> None:
    TASK_FAILURES.labels(getattr(sender, "name", "unknown")).inc()


@setup_logging.connect
def log_like_the_web_app(loglevel: Any = None, **kwargs: Any) -> None:
    """The worker and beat write the web app's format (LOG_FORMAT), at their --loglevel."""
    from django.conf import settings

    logging.config.dictConfig(settings.LOGGING)
    if loglevel:
        logging.getLogger().setLevel(loglevel)
