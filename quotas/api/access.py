"""One access line per API call: method, path, status, outcome, tenant, feature, latency.

It replaces Django's `django.request` line for API responses, which logs every 4xx as a
WARNING ("Too Many Requests: /api/v1/reservations"): a quota refusal is the API doing its
job, so it is logged at INFO like a grant; 503 at WARNING, any other 5xx at ERROR.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from django.http import HttpRequest, HttpResponseBase

from quotas.api.middleware import GetResponse, is_api

log = logging.getLogger("quotas.access")
NOTED = "quota.access"  # the key in request.META under which the view notes what it knows
SHOWN_CHARACTERS = 100


def access_note(request: HttpRequest, **fields: str | None) -> None:
    """What the view knows about the call (tenant, feature, outcome), for its access line."""
    request.META.setdefault(NOTED, {}).update(
        {name: value for name, value in fields.items() if value}
    )


def AccessLogMiddleware(get_response: GetResponse) -> GetResponse:
    def middleware(request: HttpRequest) -> HttpResponseBase:
        if not is_api(request):
            return get_response(request)
        started = time.perf_counter()
        response = get_response(request)
        _log(request, response, (time.perf_counter() - started) * 1000)
        response._has_been_logged = True  # type: ignore[attr-defined]  # django.request's flag
        return response

    return middleware


def _log(request: HttpRequest, response: HttpResponseBase, latency_ms: float) -> None:
    status = response.status_code
    level = logging.INFO if status < 500 else logging.WARNING if status == 503 else logging.ERROR
    if not log.isEnabledFor(level):
        return
    noted = request.META.get(NOTED, {})
    fields = {
        "method": request.method,
        "path": _shown(request.path),
        "status": status,
        "outcome": noted.get("outcome") or _error_code(response) or f"http_{status}",
        "tenant": _shown(noted.get("tenant", "-")),
        "feature": _shown(noted.get("feature", "-")),
        "latency_ms": round(latency_ms, 2),
    }
    log.log(
        level,
        "%(method)s %(path)s %(status)s %(outcome)s tenant=%(tenant)s feature=%(feature)s "
        "%(latency_ms).2f ms",
        fields,
        extra=fields,
    )


def _error_code(response: HttpResponseBase) -> str | None:
    """The `error` of an API error body, whether DRF or Django's handlers wrote it."""
    if response.status_code < 400:
        return None
    data: Any = getattr(response, "data", None)
    if data is None and response.get("Content-Type", "").startswith("application/json"):
        try:
            data = json.loads(response.content)  # type: ignore[attr-defined]
        except (AttributeError, ValueError):
            return None
    code = data.get("error") if isinstance(data, dict) else None
    return _shown(code) if isinstance(code, str) else None


def _shown(value: str) -> str:
    """A value that may come from the caller, safe on one text line."""
    value = value[:SHOWN_CHARACTERS]
    return value if value.isprintable() else repr(value)
