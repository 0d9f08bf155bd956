"""The reservation API (v1). Views validate, call one service, and render.

Reserve, commit, release and extend are the hot path: an ordinary JSON POST to them is
answered by `JsonPost`, which authenticates, parses, validates and renders exactly as the DRF
view would, without DRF's request wrapping, content negotiation and renderer. In the deployed
application it runs in front of Django's handler (`quotas.api.wsgi.FastPath`); through
Django, the route's plain view (`json_post`) runs it. Everything else (reads, other methods,
other media types, a format override) goes to the DRF view, which also declares the routes
for the OpenAPI schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.encoders import JSONEncoder
from rest_framework.utils.json import strict_constant
from rest_framework.views import APIView

from quotas import reservations
from quotas.api.auth import ApiPrincipal, authenticate
from quotas.api.errors import error_of
from quotas.api.representations import (
    lease_body,
    ratelimit_headers,
    reserved_body,
    settled_body,
)
from quotas.api.serializers import COMMIT, EXTEND, RELEASE, RESERVE
from quotas.errors import QuotaError
from quotas.plan import KeyInfo
from quotas.reservations import CommitInput, ReserveInput, body_hash
from quotas.usage import feature_usage

ERRORS = {
    400: OpenApiResponse(description="invalid_request"),
    401: OpenApiResponse(description="unauthenticated"),
    403: OpenApiResponse(description="forbidden"),
    404: OpenApiResponse(description="not_found"),
    409: OpenApiResponse(description="conflict"),
    423: OpenApiResponse(description="feature_paused"),
    429: OpenApiResponse(description="rate_limited or budget_exhausted"),
    503: OpenApiResponse(description="unavailable"),
}

# (status, body, headers) of a successful answer
Answer = tuple[int, dict[str, Any], dict[str, str]]


# -- what each call does, whoever serves it --------------------------------------------------


def reserve_answer(key: KeyInfo, raw: Any) -> Answer:
    data = RESERVE.validate(raw)
    hashed = ""
    if "idempotency_key" in data:  # only a replay needs the body's fingerprint
        hashed = body_hash({k: v for k, v in raw.items() if k != "idempotency_key"})
    outcome = reservations.reservation_reserve(key=key, data=ReserveInput(**data, body_hash=hashed))
    body = reserved_body(outcome)
    headers = ratelimit_headers(body["limits"])
    if body["degraded"]:
        headers["Quota-Degraded"] = "store-unavailable; admitted without enforcement"
    return 201, body, headers


def commit_answer(key: KeyInfo, raw: Any, reservation_id: str) -> Answer:
    data = COMMIT.validate(raw)
    settled = reservations.reservation_commit(
        key=key,
        reservation_id=reservation_id,
        data=CommitInput(**data, body_hash=body_hash(data)),
    )
    return 200, settled_body(settled), {}


def release_answer(key: KeyInfo, raw: Any, reservation_id: str) -> Answer:
    RELEASE.validate(raw)
    settled = reservations.reservation_release(key=key, reservation_id=reservation_id)
    return 200, settled_body(settled), {}


def extend_answer(key: KeyInfo, raw: Any, reservation_id: str) -> Answer:
    data = EXTEND.validate(raw)
    lease = reservations.reservation_extend(
        key=key, reservation_id=reservation_id, ttl_seconds=data["ttl_seconds"]
    )
    return 200, lease_body(lease), {}


def with_limit_headers(exc: Exception) -> Exception:
    """A refusal naming a limit carries that limit's RateLimit headers."""
    if isinstance(exc, QuotaError) and "limit" in exc.extra:
        limit = dict(exc.extra["limit"])
        limit["reset_seconds"] = int(exc.headers.get("Retry-After", "0"))
        exc.headers.update(ratelimit_headers([limit]))
    return exc


# -- DRF views: reads, the schema, and requests off the fast path ----------------------------


class QuotaView(APIView):
    def principal(self, request: Request) -> ApiPrincipal:
        user = request.user
        assert isinstance(user, ApiPrincipal)
        return user

    def answer(self, request: Request, call: Callable[..., Answer], **kwargs: Any) -> Response:
        status, body, headers = call(self.principal(request).key, request.data, **kwargs)
        return Response(body, status=status, headers=headers)

    def handle_exception(self, exc: Exception) -> Response:
        return super().handle_exception(with_limit_headers(exc))


class ReservationListView(QuotaView):
    @extend_schema(request=RESERVE.serializer(), responses={201: dict, **ERRORS})
    def post(self, request: Request) -> Response:
        return self.answer(request, reserve_answer)


class ReservationDetailView(QuotaView):
    @extend_schema(responses={200: dict, **ERRORS})
    def get(self, request: Request, reservation_id: str) -> Response:
        lease = reservations.reservation_get(
            key=self.principal(request).key, reservation_id=reservation_id
        )
        return Response(lease_body(lease))


class ReservationCommitView(QuotaView):
    @extend_schema(request=COMMIT.serializer(), responses={200: dict, **ERRORS})
    def post(self, request: Request, reservation_id: str) -> Response:
        return self.answer(request, commit_answer, reservation_id=reservation_id)


class ReservationReleaseView(QuotaView):
    @extend_schema(request=RELEASE.serializer(), responses={200: dict, **ERRORS})
    def post(self, request: Request, reservation_id: str) -> Response:
        return self.answer(request, release_answer, reservation_id=reservation_id)


class ReservationExtendView(QuotaView):
    @extend_schema(request=EXTEND.serializer(), responses={200: dict, **ERRORS})
    def post(self, request: Request, reservation_id: str) -> Response:
        return self.answer(request, extend_answer, reservation_id=reservation_id)


class FeatureUsageView(QuotaView):
    @extend_schema(responses={200: dict, **ERRORS})
    def get(self, request: Request, slug: str) -> Response:
        return Response(feature_usage(key=self.principal(request).key, slug=slug))


# -- the fast path: plain Django views for the POSTs -----------------------------------------

JSON = "application/json"
# Accept headers DRF's negotiation answers with its one renderer, JSON, as it is.
PLAIN_ACCEPT = frozenset({"*/*", JSON})
_ENCODER = JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
UTF8 = frozenset({"utf-8", "utf8"})
LONG_NUMBER = re.compile(rb"[0-9]{19}")
LINE_SEPARATORS = ("\u2028".encode(), "\u2029".encode())  # both begin with the byte E2
# datetimes, dataclasses and subclasses of str, int, dict and list go to DRF's encoder
PASSTHROUGH = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


@dataclass(frozen=True, slots=True)
class JsonPost:
    """How an ordinary JSON POST to one of the hot routes is answered: `call`, with the
    `Allow` header of the route's DRF view. Served by the route's Django view (`json_post`)
    and, in front of Django, by `quotas.api.wsgi.FastPath`."""

    call: Callable[..., Answer]
    allow: str

    def answer(
        self, request: HttpRequest, length: int, kwargs: dict[str, Any]
    ) -> tuple[int, bytes, dict[str, str]]:
        """Status, body and headers (besides Content-Type and Allow), as DRF would answer:
        the key first, then the body, then the call; every error as the API's JSON."""
        try:
            key = authenticate(request).key
            status, body, headers = self.call(key, _json_body(request, length), **kwargs)
        except Exception as exc:
            error = error_of(with_limit_headers(exc))
            status, body, headers = error.status, error.body(), error.headers
        return status, _render(body), headers


def plain_post_length(meta: Mapping[str, Any]) -> int | None:
    """The body's length when a request is an ordinary JSON POST, else None.

    Ordinary: method POST, a body of exactly `application/json` (or none at all), an Accept
    header that is absent, `*/*` or `application/json`, and no query string (DRF reads a
    `format` override there). For those, DRF would authenticate, parse with its JSON parser,
    call the view and render JSON, which `JsonPost.answer` does without DRF."""
    length = _content_length(meta)
    if (
        str(meta.get("REQUEST_METHOD", "")).upper() != "POST"
        or (meta.get("CONTENT_TYPE") != JSON and length)
        or meta.get("HTTP_ACCEPT", "*/*") not in PLAIN_ACCEPT
        or meta.get("QUERY_STRING")
    ):
        return None
    return length


def json_post(drf_view: type[QuotaView], call: Callable[..., Answer]) -> Callable[..., Any]:
    """A view answering ordinary JSON POSTs (see `plain_post_length`) with `call` and the
    rest with `drf_view`, with the same errors, headers and bytes DRF gives."""
    fallback = drf_view.as_view()
    route = JsonPost(call=call, allow=", ".join(drf_view().allowed_methods))

    def view(request: HttpRequest, **kwargs: Any) -> HttpResponse:
        length = plain_post_length(request.META)
        if length is None:
            return fallback(request, **kwargs)
        status, data, headers = route.answer(request, length, kwargs)
        response = HttpResponse(data, status=status, content_type=JSON, headers=headers)
        response["Allow"] = route.allow
        return response

    # drf-spectacular documents the route from the DRF view, as for any APIView.as_view()
    view.cls = fallback.cls  # type: ignore[attr-defined]
    view.initkwargs = fallback.initkwargs  # type: ignore[attr-defined]
    view.json_post = route  # type: ignore[attr-defined]
    return csrf_exempt(view)


def _content_length(meta: Mapping[str, Any]) -> int:
    """As DRF reads it: a body of unknown or unreadable length is no body."""
    try:
        return int(meta.get("CONTENT_LENGTH", meta.get("HTTP_CONTENT_LENGTH", 0)))
    except (ValueError, TypeError):
        return 0


def _json_body(request: HttpRequest, length: int) -> Any:
    """The body as DRF's JSONParser reads it: no body is {}, NaN and Infinity are refused."""
    if length == 0:
        return {}
    raw = request.body
    if (
        request.encoding is None
        and settings.DEFAULT_CHARSET.lower() in UTF8
        and not LONG_NUMBER.search(raw)
    ):
        # orjson reads UTF-8 JSON as json does. What it refuses (NaN and Infinity, bad
        # UTF-8, escaped lone surrogates, a BOM, numbers past a double's range, nesting past
        # 1024) is read again below, which accepts it or answers exactly as before; so is a
        # body with a run of 19 or more digits, since orjson reads an integer past 64 bits
        # as a float where json keeps it whole.
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    try:
        text = raw.decode(request.encoding or settings.DEFAULT_CHARSET)
        return json.loads(text, parse_constant=strict_constant)
    except ValueError as exc:
        raise QuotaError(
            "invalid_request", f"The body is not valid JSON: JSON parse error - {exc}"
        ) from exc


def _render(body: dict[str, Any]) -> bytes:
    """As DRF's JSONRenderer renders: compact, unicode, and the two JS line separators
    escaped. orjson writes the same JSON, floats in their shortest form (7.5e-5 for DRF's
    7.5e-05). What it is not given (integers past 64 bits, lazy strings, decimals, dates,
    subclasses of the JSON types) and any body with a null in it (orjson writes NaN and
    Infinity as null, where DRF's encoder refuses them) are rendered by DRF's encoder, as
    before."""
    try:
        data = orjson.dumps(body, option=PASSTHROUGH)
    except orjson.JSONEncodeError:
        return _drf_render(body)
    if b"null" in data:
        return _drf_render(body)
    if b"\xe2" in data and (LINE_SEPARATORS[0] in data or LINE_SEPARATORS[1] in data):
        data = data.replace(LINE_SEPARATORS[0], b"\\u2028").replace(LINE_SEPARATORS[1], b"\\u2029")
    return data


def _drf_render(body: dict[str, Any]) -> bytes:
    text = _ENCODER.encode(body)
    if "\u2028" in text or "\u2029" in text:
        text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return text.encode()


reservation_list = json_post(ReservationListView, reserve_answer)
reservation_commit = json_post(ReservationCommitView, commit_answer)
reservation_release = json_post(ReservationReleaseView, release_answer)
reservation_extend = json_post(ReservationExtendView, extend_answer)
