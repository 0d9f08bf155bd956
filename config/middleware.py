"""The project's own middleware, first in MIDDLEWARE: the operator's endpoints, and the id
of each request for its logs."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

from django.core.signals import request_finished
from django.http import HttpRequest, HttpResponseBase, JsonResponse

from config import ops
from config.logs import NO_REQUEST, REQUEST_ID

GetResponse = Callable[[HttpRequest], HttpResponseBase]
OPS_VIEWS: dict[str, Callable[[HttpRequest], HttpResponseBase]] = {
    "/healthz": ops.healthz,
    "/readyz": ops.readyz,
    "/metrics": ops.metrics,
}
REQUEST_ID_SHAPE = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


def OpsMiddleware(get_response: GetResponse) -> GetResponse:
    """Answers /healthz, /readyz and /metrics before any other middleware (no host check, no
    HTTPS redirect, no session), and keeps them out of Django's request log: a probe that
    finds the node not ready is not an error of the site."""

    def middleware(request: HttpRequest) -> HttpResponseBase:
        view = OPS_VIEWS.get(request.path_info)
        if view is None:
            return get_response(request)
        if request.method not in ("GET", "HEAD"):
            response: HttpResponseBase = JsonResponse(
                {"error": "method_not_allowed", "message": "Use GET."}, status=405
            )
            response["Allow"] = "GET, HEAD"
        else:
            response = view(request)
        response._has_been_logged = True  # type: ignore[attr-defined]  # django.request's flag
        return response

    return middleware


def RequestIdMiddleware(get_response: GetResponse) -> GetResponse:
    """The caller's `X-Request-ID` when it looks like one (printable, at most 128 characters),
    else a new one: set for the logs of this request and returned in the response. It stays
    set until the response is closed, so that Django's own lines about the response (written
    after the middleware has returned) carry it too."""

    def middleware(request: HttpRequest) -> HttpResponseBase:
        given = request.META.get("HTTP_X_REQUEST_ID", "")
        request_id = given if REQUEST_ID_SHAPE.fullmatch(given) else uuid.uuid4().hex
        REQUEST_ID.set(request_id)
        response = get_response(request)
        response["X-Request-ID"] = request_id
        return response

    return middleware


def _forget_request_id(**kwargs: object) -> None:
    REQUEST_ID.set(NO_REQUEST)


request_finished.connect(_forget_request_id, dispatch_uid="config.middleware.forget_request_id")
