from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

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
