"""One protected provider call, independent of the provider: what to reserve, and what to
commit once the provider has answered (or failed to)."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from ._async import AsyncReservation
from ._errors import QuotaError
from ._held import HeldBase
from ._offline import AsyncOffline, Offline
from ._sync import Reservation
from ._types import Refusal, Usage

log = logging.getLogger("quotaclient")


@dataclass(frozen=True)
class Plan:
    """What a provider call asks for, read from its arguments."""

    model: str
    messages: list[Any]
    max_output_tokens: int  # for the whole call: every choice of it
    max_param: str  # the argument that carries the output cap
    choices: int = 1
    streaming: bool = False
    capped: bool = True  # False: the call named no cap, and is sent without one


@dataclass
class Report:
    """What a provider's answer said about its usage. Counts it did not give are None."""

    input_tokens: int | None = None
    cached_input_tokens: int = 0
    output_tokens: int | None = None
    finish_reason: str = ""
    complete: bool = False


class Tracker(Protocol):
    """Reads usage from a stream's items as they pass."""

    def observe(self, item: Any) -> bool:
        """Whether to hand the item on to the caller."""
        ...

    def report(self) -> Report: ...


# The headers a commit or release passes on: the provider's rate limits, nothing else.
RATE_LIMIT_HEADERS = ("x-ratelimit-", "anthropic-ratelimit-", "retry-after")
# What the OpenAI and Anthropic SDKs raise when no answer came: reported as status 0.
NO_ANSWER = ("APIConnectionError", "APITimeoutError")


@dataclass(frozen=True)
class Upstream:
    """The provider's answer as the raw response showed it: its status and headers."""

    status: int | None = None
    headers: dict[str, str] | None = None


def rate_limit_headers(headers: Any) -> dict[str, str] | None:
    """The rate-limit headers among a response's (httpx headers or any mapping)."""
    try:
        items = list(headers.items())
    except (AttributeError, TypeError):
        return None
    kept = {
        str(name).lower(): str(value)
        for name, value in items
        if str(name).lower().startswith(RATE_LIMIT_HEADERS)
    }
    return kept or None


def upstream_of_error(error: BaseException) -> Upstream:
    """What an exception says of the provider's answer: the OpenAI and Anthropic SDKs both
    raise an APIStatusError with `status_code` and the `response`; 0 when none came."""
    status = getattr(error, "status_code", None)
    if isinstance(status, int) and 100 <= status <= 599:
        response = getattr(error, "response", None)
        return Upstream(status, rate_limit_headers(getattr(response, "headers", None)))
    if any(cls.__name__ in NO_ANSWER for cls in type(error).__mro__):
        return Upstream(0)
    return Upstream()


def upstream_status_of(error: BaseException) -> int | None:
    return upstream_of_error(error).status


def usage_of_call(
    held: HeldBase | Offline,
    report: Report | None,
    error: BaseException | None,
    latency_ms: int,
    upstream: Upstream | None = None,
) -> Usage | Refusal:
    """What to commit for a finished call, or (a `Refusal`) to release it with: the call did
    not happen, refused by the provider (429) or never answered (0)."""
    seen = upstream or Upstream()
    if report is None:
        if error is not None:
            seen = upstream_of_error(error)
        if seen.status is None or seen.status in (0, 429):
            return Refusal(
                seen.status, latency_ms if seen.status is not None else None, seen.headers
            )
        # The provider failed: nothing was generated, the request is on record.
        return Usage(
            0,
            0,
            finish_reason="error",
            upstream_status=seen.status,
            latency_ms=latency_ms,
            upstream_headers=seen.headers,
        )
    if report.complete:
        finish = report.finish_reason
        output = report.output_tokens
    else:
        # A stream that ended early: what it generated is unknown, so the grant is charged,
        # as the server charges an expired lease.
        finish = "error" if error is not None else "incomplete"
        output = None
    return Usage(
        input_tokens=held.input_tokens if report.input_tokens is None else report.input_tokens,
        output_tokens=held.output_tokens if output is None else output,
        cached_input_tokens=report.cached_input_tokens,
        finish_reason=finish,
        upstream_status=seen.status or 200,
        latency_ms=latency_ms,
        upstream_headers=seen.headers,
    )


def elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def settle(
    reservation: Reservation | Offline,
    report: Report | None,
    error: BaseException | None,
    started: float,
    upstream: Upstream | None = None,
) -> None:
    """Commits or releases after the provider call. Never raises: the provider's answer is
    already paid for, and losing it over a quota commit would be worse than the lease
    expiring (it is then charged as reserved)."""
    usage = usage_of_call(reservation, report, error, elapsed_ms(started), upstream)
    try:
        if isinstance(usage, Refusal):
            reservation.release(usage)
        else:
            reservation.commit(**_commit_args(usage))
    except QuotaError as failure:
        log.warning("could not settle reservation %s: %s", reservation.id, failure)


async def settle_async(
    reservation: AsyncReservation | AsyncOffline,
    report: Report | None,
    error: BaseException | None,
    started: float,
    upstream: Upstream | None = None,
) -> None:
    usage = usage_of_call(reservation, report, error, elapsed_ms(started), upstream)
    try:
        if isinstance(usage, Refusal):
            await reservation.release(usage)
        else:
            await reservation.commit(**_commit_args(usage))
    except QuotaError as failure:
        log.warning("could not settle reservation %s: %s", reservation.id, failure)


def _commit_args(usage: Usage) -> dict[str, Any]:
    return {field.name: getattr(usage, field.name) for field in dataclasses.fields(usage)}
