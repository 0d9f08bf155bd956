"""The reservation API (v1). Every route is one DRF view: it validates the body (the `Body`
declarations of serializers.py), calls one service, and renders."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from quotas import reservations
from quotas.api.access import access_note
from quotas.api.auth import ApiPrincipal, SettlingAuthentication
from quotas.api.representations import (
    lease_body,
    ratelimit_headers,
    reserved_body,
    settled_body,
)
from quotas.api.responses import (
    AUTH_THROTTLED,
    RATELIMIT_HEADERS,
    RETRY_AFTER,
    FeatureUsage,
    Reservation,
    ReservationDetail,
    Settlement,
    errors,
)
from quotas.api.serializers import COMMIT, EXTEND, RELEASE, RESERVE
from quotas.errors import QuotaError
from quotas.plan import KeyInfo, plans
from quotas.reservations import CommitInput, ReleaseInput, ReserveInput, body_hash
from quotas.usage import feature_usage

# What a route that settles or reads a reservation can answer besides success.
SETTLING_ERRORS = errors(
    400,
    401,
    404,
    409,
    411,
    429,
    503,
    conflict="the reservation is not in a state that allows this",
    described={429: AUTH_THROTTLED},
)
RESERVE_EXAMPLE = OpenApiExample(
    "chat",
    request_only=True,
    value={
        "feature": "chat",
        "model": "gpt-4o-mini",
        "input_tokens": 1200,
        "max_output_tokens": 800,
    },
)
DEGRADED = "store-unavailable; admitted without enforcement"


def with_limit_headers(exc: Exception) -> Exception:
    """A refusal naming a limit carries that limit's RateLimit headers."""
    if isinstance(exc, QuotaError) and "limit" in exc.extra:
        limit = dict(exc.extra["limit"])
        limit["reset_seconds"] = int(exc.headers.get("Retry-After", "0"))
        exc.headers.update(ratelimit_headers([limit]))
    return exc


class QuotaView(APIView):
    done = ""  # the access log's outcome of a call that succeeds

    def principal(self, request: Request) -> ApiPrincipal:
        user = request.user
        assert isinstance(user, ApiPrincipal)
        return user

    def key(self, request: Request) -> KeyInfo:
        """The request's API key, as the plan knows it (only SettlingViews go on without)."""
        key = self.principal(request).key
        assert isinstance(key, KeyInfo)
        return key

    def handle_exception(self, exc: Exception) -> Response:
        return super().handle_exception(with_limit_headers(exc))

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        response = super().finalize_response(request, response, *args, **kwargs)
        access_note(
            request._request,
            tenant=_tenant_of(request),
            feature=_feature_of(request, response, kwargs),
            outcome=self._outcome(response),
        )
        return response

    def _outcome(self, response: Response) -> str | None:
        if response.status_code >= 400:
            return None  # the error code of the body says it
        return "degraded" if "Quota-Degraded" in response else self.done


def _tenant_of(request: Request) -> str | None:
    """The slug of the key's tenant, as the plan in hand knows it (none is loaded for it)."""
    key = getattr(getattr(request, "_user", None), "key", None)  # never authenticates again
    plan = plans.in_hand()
    if not isinstance(key, KeyInfo) or plan is None:
        return None
    tenant = plan.tenants.get(key.tenant_id)
    return tenant.slug if tenant else None


def _feature_of(request: Request, response: Response, kwargs: dict[str, Any]) -> str | None:
    """The feature the answer names, else the one the call asked for."""
    for source in (getattr(response, "data", None), kwargs, _body(request)):
        feature = source.get("feature") or source.get("slug") if isinstance(source, dict) else None
        if isinstance(feature, str):
            return feature
    return None


def _body(request: Request) -> Any:
    try:
        return request.data
    except Exception:  # a body DRF could not parse: it was answered 400 already
        return None


class ReservationListView(QuotaView):
    done = "reserved"

    @extend_schema(
        operation_id="reservations_create",
        tags=["reservations"],
        request=RESERVE.serializer(),
        examples=[RESERVE_EXAMPLE],
        responses={
            201: OpenApiResponse(
                Reservation,
                description="Held: make the call now; scheduled: make it at start_at.",
            ),
            **errors(
                400,
                401,
                403,
                404,
                409,
                411,
                423,
                429,
                503,
                what="feature, model or pool",
                conflict="the idempotency key was used with another body",
            ),
        },
        parameters=[RETRY_AFTER, *RATELIMIT_HEADERS],
    )
    def post(self, request: Request) -> Response:
        raw = request.data
        data = RESERVE.validate(raw)
        hashed = ""
        if "idempotency_key" in data:  # only a replay needs the body's fingerprint
            hashed = body_hash({k: v for k, v in raw.items() if k != "idempotency_key"})
        outcome = reservations.reservation_reserve(
            key=self.key(request), data=ReserveInput(**data, body_hash=hashed)
        )
        body = reserved_body(outcome)
        headers = ratelimit_headers(body["limits"])
        if body["degraded"]:
            headers["Quota-Degraded"] = DEGRADED
        return Response(body, status=201, headers=headers)


# A view that settles or reads a reservation goes on while the plan cannot be loaded, for the
# key that made the reservation (see quotas.reservations). No docstring: the schema would show
# it as every such route's description.
class SettlingView(QuotaView):
    authentication_classes = [SettlingAuthentication]


class ReservationDetailView(SettlingView):
    done = "read"

    @extend_schema(
        operation_id="reservation_get",
        tags=["reservations"],
        responses={
            200: OpenApiResponse(ReservationDetail, description="The reservation as it stands."),
            **errors(401, 404, 429, 503, described={429: AUTH_THROTTLED}),
        },
        parameters=[RETRY_AFTER],
    )
    def get(self, request: Request, reservation_id: str) -> Response:
        lease = reservations.reservation_get(
            key=self.principal(request).key, reservation_id=reservation_id
        )
        return Response(lease_body(lease))


class ReservationCommitView(SettlingView):
    done = "committed"

    @extend_schema(
        operation_id="reservation_commit",
        tags=["reservations"],
        request=COMMIT.serializer(),
        responses={
            200: OpenApiResponse(Settlement, description="Committed; the rest refunded."),
            **SETTLING_ERRORS,
        },
        parameters=[RETRY_AFTER],
    )
    def post(self, request: Request, reservation_id: str) -> Response:
        data = COMMIT.validate(request.data)
        settled = reservations.reservation_commit(
            key=self.principal(request).key,
            reservation_id=reservation_id,
            data=CommitInput(**data, body_hash=body_hash(data)),
        )
        return Response(settled_body(settled))


class ReservationReleaseView(SettlingView):
    done = "released"

    @extend_schema(
        operation_id="reservation_release",
        tags=["reservations"],
        request=RELEASE.serializer(),
        responses={
            200: OpenApiResponse(Settlement, description="Released; everything refunded."),
            **SETTLING_ERRORS,
        },
        parameters=[RETRY_AFTER],
    )
    def post(self, request: Request, reservation_id: str) -> Response:
        data = RELEASE.validate(request.data)
        settled = reservations.reservation_release(
            key=self.principal(request).key,
            reservation_id=reservation_id,
            data=ReleaseInput(**data),
        )
        return Response(settled_body(settled))


class ReservationExtendView(SettlingView):
    done = "extended"

    @extend_schema(
        operation_id="reservation_extend",
        tags=["reservations"],
        request=EXTEND.serializer(),
        responses={
            200: OpenApiResponse(ReservationDetail, description="Extended: its new expires_at."),
            **SETTLING_ERRORS,
        },
        parameters=[RETRY_AFTER],
    )
    def post(self, request: Request, reservation_id: str) -> Response:
        data = EXTEND.validate(request.data)
        lease = reservations.reservation_extend(
            key=self.principal(request).key,
            reservation_id=reservation_id,
            ttl_seconds=data["ttl_seconds"],
        )
        return Response(lease_body(lease))


class FeatureUsageView(QuotaView):
    done = "read"

    @extend_schema(
        operation_id="feature_usage",
        tags=["features"],
        responses={
            200: OpenApiResponse(FeatureUsage, description="Every limit on the feature, now."),
            **errors(401, 403, 404, 429, 503, what="feature", described={429: AUTH_THROTTLED}),
        },
        parameters=[RETRY_AFTER],
    )
    def get(self, request: Request, slug: str) -> Response:
        return Response(feature_usage(key=self.key(request), slug=slug))
