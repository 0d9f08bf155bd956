"""Typed errors: every answer of the quota server that is not a success, and the server not
answering at all. Refusals carry the limit that refused and when to come back."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ._types import Limit


class QuotaError(Exception):
    """Anything the quota server said no to, or could not be asked."""

    code = "error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: Mapping[str, Any] | None = None,
        retry_after: float | None = None,
        limit: Limit | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.body: Mapping[str, Any] = body or {}
        self.retry_after = retry_after
        self.limit = limit


class Refused(QuotaError):
    """The call may not happen now; nothing was reserved. `retry_after` (seconds) says when
    the same request would be admitted, or is None when waiting would not help."""


class RateLimited(Refused):
    """A per-minute limit (or a concurrency limit) is short."""

    code = "rate_limited"


class BudgetExhausted(Refused):
    """An hour, day or month budget is spent; `retry_after` is the time to its reset."""

    code = "budget_exhausted"


class FeaturePaused(Refused):
    """The feature's owner paused it (or its tenant is suspended)."""

    code = "feature_paused"


class Unavailable(Refused):
    """The quota store is down and the pool fails closed."""

    code = "unavailable"


class Unreachable(Unavailable):
    """The quota server did not answer (connection refused, timeout)."""

    code = "unreachable"


class InvalidRequest(QuotaError):
    """A field is missing or wrong; `fields` names them."""

    code = "invalid_request"

    @property
    def fields(self) -> dict[str, list[str]]:
        return dict(self.body.get("fields") or {})


class Unauthenticated(QuotaError):
    code = "unauthenticated"


class Forbidden(QuotaError):
    code = "forbidden"


class NotFound(QuotaError):
    code = "not_found"


class Conflict(QuotaError):
    code = "conflict"


class ServerError(QuotaError):
    code = "internal_error"


_BY_CODE: dict[str, type[QuotaError]] = {
    cls.code: cls
    for cls in (
        RateLimited,
        BudgetExhausted,
        FeaturePaused,
        Unavailable,
        InvalidRequest,
        Unauthenticated,
        Forbidden,
        NotFound,
        Conflict,
        ServerError,
    )
}
_BY_STATUS: dict[int, type[QuotaError]] = {
    400: InvalidRequest,
    401: Unauthenticated,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    423: FeaturePaused,
    429: RateLimited,
    503: Unavailable,
}


def retry_after_of(headers: Mapping[str, str], body: Mapping[str, Any]) -> float | None:
    """Seconds until the request would be admitted. The body's `retry_after_ms` is exact; the
    `Retry-After` header is the same figure rounded up to whole seconds, used when the body
    has none (a 503, or a proxy in between)."""
    exact = body.get("retry_after_ms")
    if isinstance(exact, int | float) and not isinstance(exact, bool):
        return max(0.0, exact / 1000)
    header = headers.get("Retry-After")
    if header is not None:
        try:
            seconds = float(header)
        except ValueError:
            return None  # an HTTP date: the server never sends one
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    return None


def error_from_response(
    status: int, headers: Mapping[str, str], body: Mapping[str, Any]
) -> QuotaError:
    code = str(body.get("error", ""))
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or ServerError
    limit_body = body.get("limit")
    return cls(
        str(body.get("message") or f"The quota server answered {status}."),
        status=status,
        body=body,
        retry_after=retry_after_of(headers, body),
        limit=Limit.from_body(limit_body) if isinstance(limit_body, Mapping) else None,
    )
