"""The one error type of the API. Services raise it; one DRF handler renders it as
{"error": code, "message": ..., ...} with the status its code maps to."""

from __future__ import annotations

from typing import Any

STATUS_BY_CODE = {
    "invalid_request": 400,
    "unauthenticated": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "length_required": 411,
    "feature_paused": 423,
    "rate_limited": 429,
    "budget_exhausted": 429,
    "unavailable": 503,
    "upstream_unavailable": 503,
    "internal_error": 500,
}


class QuotaError(Exception):
    def __init__(
        self,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    @property
    def status(self) -> int:
        return STATUS_BY_CODE[self.code]

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


def invalid(fields: dict[str, list[str] | str], message: str = "") -> QuotaError:
    detail = {name: errs if isinstance(errs, list) else [errs] for name, errs in fields.items()}
    summary = message or "; ".join(f"{name}: {' '.join(errs)}" for name, errs in detail.items())
    return QuotaError("invalid_request", summary, fields=detail)


def not_found(what: str) -> QuotaError:
    return QuotaError("not_found", f"No such {what}.")


def database_unavailable() -> QuotaError:
    """The plan must be (re)loaded, or a call needs the database, while it is down."""
    return QuotaError(
        "unavailable",
        "The configuration database is unavailable; try again shortly.",
        headers={"Retry-After": "5"},
    )
