"""Logs people can read and machines can parse: every line carries its time (UTC), level,
logger and the id of the request it belongs to (set by config.middleware); `LOG_FORMAT=json`
writes one JSON object a line (python-json-logger) instead of text."""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from pythonjsonlogger.json import JsonFormatter

NO_REQUEST = "-"
REQUEST_ID_FILTER_NAME = "request_id"
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default=NO_REQUEST)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
JSON_FIELDS = "%(levelname)s %(name)s %(request_id)s %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds the current request's id to every record the handler writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """ISO 8601 times in UTC, with milliseconds."""

    converter = time.gmtime  # type: ignore[assignment]  # logging's documented way to UTC
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"


def logging_config(*, level: str, fmt: str) -> dict[str, Any]:
    """The LOGGING setting: one handler on stderr, text or JSON."""
    formatters = {
        "text": {"()": TextFormatter, "format": TEXT_FORMAT},
        "json": {
            "()": JsonFormatter,
            "fmt": JSON_FIELDS,
            "rename_fields": {"levelname": "level", "name": "logger"},
            "timestamp": True,  # ISO 8601 in UTC
        },
    }
    if fmt not in formatters:
        raise ImproperlyConfigured(f"LOG_FORMAT must be text or json, not {fmt!r}.")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {REQUEST_ID_FILTER_NAME: {"()": RequestIdFilter}},
        "formatters": {"default": formatters[fmt]},
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "filters": [REQUEST_ID_FILTER_NAME],
                "formatter": "default",
            }
        },
        "root": {"handlers": ["console"], "level": level},
    }
