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
from ._types import Usage

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


def upstream_status_of(error: BaseException) -> int | None:
    """The provider's HTTP status, where the provider answered with an error (the OpenAI and
    Anthropic SDKs both raise an APIStatusError with `status_code`)."""
    status = getattr(error, "status_code", None)
    return status if isinstance(status, int) and 100 <= status <= 599 else None


def usage_of_call(
    held: HeldBase | Offline, report: Report | None, error: BaseException | None, latency_ms: int
) -> Usage | None:
    """What to commit for a finished call; None means release (the call did not happen)."""
    if report is None:
        status = upstream_status_of(error) if error is not None else None
        if status is None:
            return None  # never reached the provider, or we cannot tell: refund
        # The provider refused or failed: nothing was generated, the request is on record.
        return Usage(0, 0, finish_reason="error", upstream_status=status, latency_ms=latency_ms)
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
        upstream_status=200,
        latency_ms=latency_ms,
    )


def elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def settle(
    reservation: Reservation | Offline,
    report: Report | None,
    error: BaseException | None,
    started: float,
) -> None:
    """Commits or releases after the provider call. Never raises: the provider's answer is
    already paid for, and losing it over a quota commit would be worse than the lease
    expiring (it is then charged as reserved)."""
    usage = usage_of_call(reservation, report, error, elapsed_ms(started))
    try:
        if usage is None:
            reservation.release()
        else:
            reservation.commit(**dataclasses.asdict(usage))
    except QuotaError as failure:
        log.warning("could not settle reservation %s: %s", reservation.id, failure)


async def settle_async(
    reservation: AsyncReservation | AsyncOffline,
    report: Report | None,
    error: BaseException | None,
    started: float,
) -> None:
    usage = usage_of_call(reservation, report, error, elapsed_ms(started))
    try:
        if usage is None:
            await reservation.release()
        else:
            await reservation.commit(**dataclasses.asdict(usage))
    except QuotaError as failure:
        log.warning("could not settle reservation %s: %s", reservation.id, failure)
