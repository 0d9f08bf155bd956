"""What the API answers, as named OpenAPI components: every success body, the one error body,
and which errors each route can give.

These serializers only describe: the views build their answers in representations.py (a
serializer per answer would cost more than the reservation's Redis round trip). None of them
closes its object (no `additionalProperties: false`), so a field added to an answer is
backward compatible for every client generated from the schema; add it here as well, so
that it is documented. The statuses a reservation can be in are listed once, below.
"""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import serializers

from quotas.errors import STATUS_BY_CODE
from tenants.models import Priority

# Every status a reservation can be in, in any answer (the one enum of the schema for it).
RESERVATION_STATUSES = ("scheduled", "held", "committed", "released", "expired")
ERROR_CODES = tuple(STATUS_BY_CODE)
PRIORITIES = tuple(Priority.values)


class Limit(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField(help_text="Says what the limit is, in words.")
    scope = serializers.DictField(
        child=serializers.CharField(), help_text="The tenant, feature, pool or model it covers."
    )
    metric = serializers.CharField(help_text="requests, tokens, input_tokens, ..., cost_usd.")
    window = serializers.CharField(
        allow_null=True, help_text="minute (a token bucket), hour, day or month (a budget)."
    )
    enforcement = serializers.CharField(help_text="hard, soft or shadow.")
    limit = serializers.FloatField(help_text="The amount, in the metric's units (USD for cost).")
    remaining = serializers.FloatField()
    reset = serializers.DateTimeField(
        required=False, help_text="When a bucket is full again, or a budget's period ends."
    )
    reset_seconds = serializers.IntegerField(required=False)
    configured = serializers.FloatField(
        required=False,
        help_text="A pool's own per-minute limit: its configured amount (`limit` is then the "
        "effective one, at the pool's adaptive share).",
    )
    adapted = serializers.BooleanField(
        required=False, help_text="A pool's own per-minute limit: below its configured amount."
    )


class LimitUsage(Limit):
    used = serializers.FloatField()


class Amounts(serializers.Serializer):
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    cost_usd = serializers.FloatField()


class HeldAmounts(serializers.Serializer):
    """What a reservation holds; unknown (null) for one admitted while the store was down."""

    input_tokens = serializers.IntegerField(allow_null=True)
    output_tokens = serializers.IntegerField(allow_null=True)
    cost_usd = serializers.FloatField()


class Granted(serializers.Serializer):
    output_tokens = serializers.IntegerField()
    partial = serializers.BooleanField(  # type: ignore[assignment]  # a field, not the option
        help_text="Fewer output tokens than asked were granted."
    )


class Usage(serializers.Serializer):
    input_tokens = serializers.IntegerField()
    cached_input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    cost_usd = serializers.FloatField()


def status_field(**options: object) -> serializers.ChoiceField:
    return serializers.ChoiceField(choices=RESERVATION_STATUSES, **options)  # type: ignore[arg-type]


class Breaker(serializers.Serializer):
    """A pool whose circuit breaker changed the decision."""

    pool = serializers.CharField()
    state = serializers.ChoiceField(choices=["open", "half_open"])
    probe = serializers.BooleanField(
        required=False, help_text="Half-open: this reservation is the second's probe call."
    )
    retry_after_ms = serializers.IntegerField(
        required=False, help_text="Skipped: when the pool takes calls again."
    )


class Reservation(serializers.Serializer):
    """A new reservation: what it holds, until when, and every limit it was checked against."""

    id = serializers.CharField()
    status = status_field()
    feature = serializers.CharField()
    model = serializers.CharField()
    pool = serializers.CharField(help_text="Use this pool's provider credentials.")
    priority = serializers.ChoiceField(choices=PRIORITIES)
    input_tokens_estimated = serializers.BooleanField()
    reserved = Amounts()
    granted = Granted()
    expires_at = serializers.DateTimeField()
    limits = Limit(many=True)
    would_refuse = serializers.ListField(
        child=serializers.CharField(), help_text="Soft and shadow limits that would refuse."
    )
    degraded = serializers.BooleanField(
        help_text="Admitted without enforcement: the store was down and the pool fails open."
    )
    start_at = serializers.DateTimeField(
        required=False, help_text="Scheduled: the call may go to the provider from then on."
    )
    wait_ms = serializers.IntegerField(required=False, help_text="Scheduled: until start_at.")
    breaker = Breaker(
        many=True,
        required=False,
        help_text="The pools whose circuit breaker changed the decision (skipped, or a probe).",
    )


class Settlement(serializers.Serializer):
    """A committed or released reservation: its final usage and what went back."""

    id = serializers.CharField()
    status = status_field()
    lease_expired = serializers.BooleanField(help_text="The commit came after the lease expired.")
    usage = Usage()
    refunded = Amounts(help_text="Negative when the usage overran the reservation.")
    overrun = serializers.BooleanField()
    degraded = serializers.BooleanField()


class ReservationDetail(serializers.Serializer):
    """A reservation as it stands; once settled, with its settlement's fields."""

    id = serializers.CharField()
    status = status_field()
    feature = serializers.CharField(allow_null=True)
    model = serializers.CharField(allow_null=True)
    pool = serializers.CharField(allow_null=True)
    priority = serializers.ChoiceField(choices=PRIORITIES, allow_null=True)
    input_tokens_estimated = serializers.BooleanField()
    reserved = HeldAmounts()
    created_at = serializers.DateTimeField()
    start_at = serializers.DateTimeField(required=False, help_text="When it was to start.")
    wait_ms = serializers.IntegerField(required=False, help_text="Scheduled: until start_at.")
    expires_at = serializers.DateTimeField()
    metadata = serializers.DictField()
    lease_expired = serializers.BooleanField(required=False)
    usage = Usage(required=False)
    refunded = Amounts(required=False)
    overrun = serializers.BooleanField(required=False)
    degraded = serializers.BooleanField(required=False)


class FeatureUsage(serializers.Serializer):
    feature = serializers.CharField()
    status = serializers.CharField(help_text="active or paused.")
    priority = serializers.ChoiceField(choices=PRIORITIES)
    limits = LimitUsage(many=True)


class Error(serializers.Serializer):
    """Every error: a code, a message, and what else the code needs."""

    error = serializers.ChoiceField(choices=ERROR_CODES)
    message = serializers.CharField()
    fields = serializers.DictField(  # type: ignore[assignment]  # a body field, popped by DRF
        child=serializers.ListField(child=serializers.CharField()),
        required=False,
        help_text="invalid_request: what is wrong with each field.",
    )
    limit = Limit(required=False, help_text="rate_limited, budget_exhausted: the limit.")
    retry_after_ms = serializers.IntegerField(
        required=False,
        allow_null=True,
        help_text="rate_limited, budget_exhausted: exact wait; null when waiting cannot help.",
    )


# What each status means, route by route where it differs.
ERROR_WHEN = {
    400: "invalid_request: a field is missing or wrong; `fields` names each.",
    401: "unauthenticated: no key, an unknown key or a revoked one.",
    403: "forbidden: the key is narrowed to other features.",
    404: "not_found: unknown (or another tenant's) {what}.",
    409: "conflict: {conflict}.",
    411: "length_required: a chunked body sent to a server that does not decode it.",
    423: "feature_paused: the feature's owner paused it.",
    429: (
        "rate_limited: a per-minute limit is short, or budget_exhausted: a budget is spent "
        "(`limit` names it, `Retry-After` says when); also rate_limited after too many failed "
        "authentications from the caller's address."
    ),
    503: "unavailable: the store cannot decide and the pool fails closed, or the "
    "configuration cannot be loaded; or upstream_unavailable: every candidate pool's circuit "
    "breaker is open (`pool` names it); `Retry-After` says when to try again.",
}
# A route without a reservation limit can still answer 429: to an address that keeps failing
# authentication.
AUTH_THROTTLED = "rate_limited: too many failed authentications from the caller's address."


def errors(
    *statuses: int,
    what: str = "reservation",
    conflict: str = "",
    described: dict[int, str] | None = None,
) -> dict[int, OpenApiResponse]:
    """The error answers of a route: the statuses it can give, each with the Error body and
    what it means there (`described` overrides the usual words)."""
    words = {status: ERROR_WHEN[status] for status in statuses} | (described or {})
    return {
        status: OpenApiResponse(Error, description=text.format(what=what, conflict=conflict))
        for status, text in words.items()
    }


RETRY_AFTER = OpenApiParameter(
    "Retry-After",
    OpenApiTypes.INT,
    OpenApiParameter.HEADER,
    response=[429, 503],
    description="Seconds to wait before the same request can succeed.",
)
RATELIMIT_HEADERS = [
    OpenApiParameter(
        name,
        OpenApiTypes.STR,
        OpenApiParameter.HEADER,
        response=[201],
        description=f"IETF {name} of the tightest token or request limit.",
    )
    for name in ("RateLimit-Policy", "RateLimit")
]


def request_rules(result: dict, generator: object, **kwargs: object) -> dict:
    """A drf-spectacular postprocessing hook: rules of the request bodies (serializers.py)
    that their serializers cannot state. A body with an unknown field is refused, and a
    reservation takes exactly one of input_tokens, messages or prompt."""
    schemas = result["components"]["schemas"]
    for name in ("ReserveRequest", "CommitRequest", "ExtendRequest", "ReleaseRequest"):
        schemas[name]["additionalProperties"] = False
    inputs = ("input_tokens", "messages", "prompt")
    schemas["ReserveRequest"]["oneOf"] = [{"required": [name]} for name in inputs]
    return result
