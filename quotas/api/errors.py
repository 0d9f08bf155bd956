"""One exception handler: every API error is JSON {"error", "message", ...}, never HTML."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from quotas.errors import QuotaError, database_unavailable, invalid

log = logging.getLogger(__name__)


def _as_quota_error(exc: Exception) -> QuotaError | None:
    if isinstance(exc, QuotaError):
        return exc
    if isinstance(exc, exceptions.ValidationError):
        detail = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        return invalid({name: [str(e) for e in _flat(errs)] for name, errs in detail.items()})
    if isinstance(exc, exceptions.ParseError):
        return QuotaError("invalid_request", f"The body is not valid JSON: {exc.detail}")
    if isinstance(exc, exceptions.UnsupportedMediaType):
        return QuotaError("invalid_request", "Send the body as application/json.")
    if isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
        return QuotaError("unauthenticated", str(exc.detail))
    if isinstance(exc, exceptions.PermissionDenied):
        return QuotaError("forbidden", str(exc.detail))
    if isinstance(exc, RequestDataTooBig):
        return QuotaError(
            "invalid_request",
            f"The body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE:,} bytes; for a "
            "longer prompt, count its tokens and send input_tokens.",
        )
    if isinstance(exc, Http404 | exceptions.NotFound):
        return QuotaError("not_found", "No such resource.")
    if isinstance(exc, exceptions.MethodNotAllowed):
        return QuotaError("method_not_allowed", str(exc.detail))
    if isinstance(exc, DatabaseError):
        # reached when a plan must be (re)loaded, or a read needs the database, while it is down
        log.warning("database unavailable: %s", exc)
        return database_unavailable()
    return None


def _flat(errs: Any) -> list[Any]:
    if isinstance(errs, dict):
        return [f"{k}: {' '.join(map(str, _flat(v)))}" for k, v in errs.items()]
    if isinstance(errs, list):
        return [e for err in errs for e in _flat(err)]
    return [errs]


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    error = _as_quota_error(exc)
    if error is None:
        response = drf_exception_handler(exc, context)
        if response is not None:
            detail = response.data.get("detail", "") if isinstance(response.data, dict) else ""
            response.data = {"error": "invalid_request", "message": str(detail)}
            return response
    error = error or unhandled(exc)
    return Response(error.body(), status=error.status, headers=error.headers)


def unhandled(exc: Exception) -> QuotaError:
    """What an unexpected exception answers, once logged."""
    log.exception("unhandled error in the API", exc_info=exc)
    return QuotaError("internal_error", "Something went wrong on our side; it was logged.")


def json_bad_request(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    """A request Django refuses before any view (a Host not allowed, say), in the API's shape."""
    refused = QuotaError("invalid_request", "The request was refused.")
    return JsonResponse(refused.body(), status=400)


def json_not_found(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    """Under /api/ an unknown route answers in the API's shape, not with an HTML page."""
    return JsonResponse(QuotaError("not_found", "No such route.").body(), status=404)


def json_server_error(request: HttpRequest) -> JsonResponse:
    return JsonResponse(
        QuotaError("internal_error", "Something went wrong on our side; it was logged.").body(),
        status=500,
    )
