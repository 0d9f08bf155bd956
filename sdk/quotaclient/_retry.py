"""When to try a refused reservation again, and how often any retry may happen at all.

Two rules keep many clients from retrying in lockstep (a thundering herd):

* a retry waits the server's `Retry-After` plus *full jitter*: a uniform random share of an
  exponentially growing window, so clients refused at the same instant spread out instead of
  coming back at the same instant;
* a *retry budget* bounds retries to a share of the client's requests (a token bucket that
  every first attempt fills a little and every retry drains by one), so a sustained outage
  adds at most that share of load instead of multiplying it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from ._errors import BudgetExhausted, FeaturePaused, QuotaError, RateLimited, Unavailable


class RetryBudget:
    """A token bucket of retries shared by every call of one client: each first attempt
    deposits `ratio` of a retry, up to `burst`; each retry withdraws one. It starts full, so a
    new client may retry `burst` times before its own traffic pays for more."""

    def __init__(self, ratio: float = 0.1, burst: float = 10.0) -> None:
        if ratio < 0 or burst < 0:
            raise ValueError("ratio and burst must not be negative")
        self.ratio = ratio
        self.burst = burst
        self._tokens = burst
        self._lock = threading.Lock()

    @property
    def tokens(self) -> float:
        return self._tokens

    def record_request(self) -> None:
        with self._lock:
            self._tokens = min(self.burst, self._tokens + self.ratio)

    def try_spend(self) -> bool:
        with self._lock:
            if self._tokens < 1 - 1e-9:  # ten deposits of 0.1 add up to 0.999...
                return False
            self._tokens = max(0.0, self._tokens - 1)
            return True


@dataclass(frozen=True)
class RetryPolicy:
    """How long a reservation may wait for admission.

    `max_wait` is the total time (seconds) one `reserve` may spend waiting; 0 raises the first
    refusal at once. With `schedule` (the default) the server is asked to keep the call's
    place in line for that long (`max_wait_ms`): it answers when the call may start, and the
    client sleeps until then, one request instead of retries. A refusal (the line is full, or
    longer than the wait) is retried as without it. A retry waits
    `retry_after + uniform(0, min(cap, base * 2**attempt))`: never before the server said the
    request could be admitted, and spread out after that."""

    max_wait: float = 0.0
    base: float = 0.5
    cap: float = 30.0
    schedule: bool = True

    def delay(self, error: QuotaError, attempt: int, rng: random.Random) -> float:
        floor = error.retry_after or 0.0
        window = min(self.cap, self.base * 2**attempt)
        return floor + rng.uniform(0.0, window)


def retryable(error: QuotaError) -> bool:
    """Refusals that waiting can cure. A paused feature needs its owner; a request larger
    than a limit can ever admit comes with no retry time and never will be admitted."""
    if isinstance(error, FeaturePaused):
        return False
    if isinstance(error, RateLimited | BudgetExhausted):
        return error.retry_after is not None
    return isinstance(error, Unavailable)


@dataclass
class Waiter:
    """The waiting of one reserve call: it owns the attempt count and the time spent."""

    policy: RetryPolicy
    budget: RetryBudget
    rng: random.Random
    clock: Callable[[], float] = time.monotonic
    attempt: int = 0
    started: float = 0.0

    def __post_init__(self) -> None:
        self.started = self.clock()
        self.budget.record_request()

    def max_wait_ms(self) -> int | None:
        """What the next attempt may offer to wait in line (ms), or None: do not ask."""
        if not self.policy.schedule:
            return None
        left = self.policy.max_wait - (self.clock() - self.started)
        wait = min(MAX_WAIT_MS, int(left * 1000))
        return wait if wait > 0 else None

    def next_delay(self, error: QuotaError) -> float | None:
        """Seconds to sleep before the next attempt, or None to give up and raise `error`."""
        if not retryable(error):
            return None
        left = self.policy.max_wait - (self.clock() - self.started)
        # Giving up now beats sleeping past the deadline only to be refused anyway.
        if (error.retry_after or 0.0) > left or left <= 0:
            return None
        if not self.budget.try_spend():
            return None
        delay = min(left, self.policy.delay(error, self.attempt, self.rng))
        self.attempt += 1
        return delay


MAX_WAIT_MS = 300_000  # the most the server accepts as max_wait_ms
TRANSPORT_RETRIES = 2
TRANSPORT_BASE = 0.1


def transport_retry_delay(
    error: Exception,
    *,
    resendable: bool,
    attempt: int,
    budget: RetryBudget,
    rng: random.Random,
) -> float | None:
    """A call that got no answer may be sent again when sending it twice does no harm
    (reserve with its idempotency key, commit, extend), or when it never left (connection
    refused). A release sent twice would answer `conflict` the second time."""
    if attempt >= TRANSPORT_RETRIES:
        return None
    if not (resendable or isinstance(error, httpx.ConnectError)):
        return None
    if not budget.try_spend():
        return None
    return rng.uniform(0.0, TRANSPORT_BASE * 2**attempt)
