"""The quota engine's Prometheus metrics, recorded where each thing happens.

Labels come from the configured plan (tenant, feature and pool slugs) or from fixed sets
(outcomes, reasons, script names, error classes), never from what a caller sent, so their
number is bounded by the configuration. Under gunicorn, prometheus-client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR) writes each process's values to a file that `/metrics` sums.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RESERVATIONS = Counter(
    "quota_reservations",
    "Reserve decisions: granted, degraded (admitted unenforced), refused, paused, unavailable.",
    ["outcome", "reason", "tenant", "feature", "pool"],
)
DEGRADED_GRANTS = Counter(
    "quota_degraded_grants",
    "Reservations admitted without enforcement because the store could not decide.",
    ["reason", "tenant", "feature", "pool"],
)
SCRIPT_SECONDS = Histogram(
    "quota_script_duration_seconds",
    "One Lua script call (EVALSHA) as this process saw it, the round trip included.",
    ["script"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0),
)
REDIS_ERRORS = Counter(
    "quota_redis_errors",
    "Lua script calls that failed with a Redis error, by script and error class.",
    ["script", "error"],
)
PLAN_RELOADS = Counter(
    "quota_plan_reloads",
    "Loads of the compiled plan from the database: loaded, or failed.",
    ["outcome"],
)
ALLOTMENT_UNITS = Gauge(
    "quota_allotment_units",
    "Units of a shared limit each partition holds, as the rebalancer's last round left them "
    "(a partitioned store; quotas/allotments.py).",
    ["limit", "partition"],
    multiprocess_mode="mostrecent",
)
ALLOTMENT_MOVED = Counter(
    "quota_allotment_moved_units",
    "Units of shared limits the rebalancer gave to another partition.",
)
ALLOTMENT_ROUND = Gauge(
    "quota_allotment_last_round_timestamp_seconds",
    "When the rebalancer last finished a round (Unix time): on a partitioned store, shared "
    "limits stop following demand when it no longer moves.",
    multiprocess_mode="max",
)
