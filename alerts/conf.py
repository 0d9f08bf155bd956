"""The alerts' settings: a Django setting of the same name wins, else the environment
variable, else the default. Read when used, never at import time."""

from __future__ import annotations

from typing import Any

import environ
from django.conf import settings

_env = environ.Env()

DEFAULTS: dict[str, int | float | str] = {
    # a storm of alerts about one feature (or tenant) goes out as one message per window
    "ALERTS_STORM_WINDOW_SECONDS": 600,
    # attempts per delivery, and the first wait between them (doubled each time, capped)
    "ALERTS_RETRY_ATTEMPTS": 3,
    "ALERTS_RETRY_BACKOFF_SECONDS": 0.5,
    "ALERTS_RETRY_MAX_WAIT_SECONDS": 8.0,
    "ALERTS_HTTP_TIMEOUT_SECONDS": 10.0,
    # networks webhooks may post to besides public addresses (comma-separated CIDRs)
    "ALERTS_HTTP_ALLOWED_NETWORKS": "",
    # a delivery still "sending" after this long belonged to a worker that died
    "ALERTS_STUCK_DELIVERY_SECONDS": 900,
}


def alerts_setting(name: str) -> Any:
    default = DEFAULTS[name]
    if hasattr(settings, name):
        return getattr(settings, name)
    return _env.get_value(name, cast=type(default), default=default)
