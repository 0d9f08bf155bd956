"""The alerts' Prometheus metrics (see quotas.metrics for how they are collected)."""

from __future__ import annotations

from prometheus_client import Counter

DELIVERIES = Counter(
    "quota_alert_deliveries",
    "Alert deliveries sent through a channel, by kind (email, slack, webhook) and outcome "
    "(sent, failed, or failed_permanent: the channel was disabled).",
    ["kind", "outcome"],
)
