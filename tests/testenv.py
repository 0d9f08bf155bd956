"""Tests run against the real Redis (a dedicated database index, flushed per test) and the
real database (SQLite by default, PostgreSQL when DATABASE_URL is set)."""

from __future__ import annotations

import os

os.environ.setdefault("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ["REDIS_URL"] = os.environ["TEST_REDIS_URL"]
os.environ.setdefault("CELERY_TASK_ALWAYS_EAGER", "true")
# the tests' fake Slack and webhook receivers listen on loopback
os.environ.setdefault("ALERTS_HTTP_ALLOWED_NETWORKS", "127.0.0.0/8,::1/128")
