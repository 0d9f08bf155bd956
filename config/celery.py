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
    "evaluate-alerts": {"task": "alerts.tasks.evaluate_alerts", "schedule": 60.0},
}
