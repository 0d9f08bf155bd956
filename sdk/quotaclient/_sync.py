"""The synchronous client: reserve, then commit or release, with the lease kept alive by a
background thread while the call runs."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from types import TracebackType
from typing import Any

import httpx

from ._errors import QuotaError, Unreachable
from ._held import HeldBase
from ._keeper import LeaseKeeper
from ._protocol import (
    base_url_of,
    decode,
    headers_of,
    reservation_path,
    reserve_request,
    with_wait,
)
from ._retry import RetryBudget, RetryPolicy, Waiter, transport_retry_delay
from ._types import Grant, Refusal, Settlement, Usage, parse_time

log = logging.getLogger("quotaclient")


class QuotaClient:
    """A client of the quota server. Thread-safe: share one per process.

    `base_url` and `api_key` default to the QUOTA_URL and QUOTA_API_KEY environment variables.
    `retry` says how long a reservation may wait for admission (by default it does not wait);
    `budget` bounds the retries of every call of this client. `sleep`, `clock` and `rng` are
    what waiting uses: tests pass fakes."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        budget: RetryBudget | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.budget = budget or RetryBudget()
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._http = httpx.Client(
            base_url=base_url_of(base_url), headers=headers_of(api_key), timeout=timeout
        )
        self._keeper = LeaseKeeper()

    def __enter__(self) -> QuotaClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._keeper.stop()
        self._http.close()

    def reserve(
        self,
        feature: str,
        model: str,
        *,
        max_output_tokens: int,
        input_tokens: int | None = None,
        messages: Iterable[Any] | None = None,
        prompt: str | None = None,
        min_output_tokens: int | None = None,
        priority: str | None = None,
        pool: str | None = None,
        ttl_seconds: int = 60,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        max_wait: float | None = None,
    ) -> Reservation:
        """Reserves the worst case of one call: input tokens (counted, or estimated by the
        server from `messages` or `prompt`) plus `max_output_tokens`. With
        `min_output_tokens`, the server may grant less output (`reservation.output_tokens`).
        Raises a `Refused` subclass when the call may not happen, after waiting up to
        `max_wait` seconds (default: the client's retry policy) for admission. Within that
        wait the server may schedule the call (it is short only of per-minute capacity): the
        capacity is taken now and this returns once the call may start, after one sleep
        (`reservation.wait_ms`)."""
        request = reserve_request(
            feature=feature,
            model=model,
            max_output_tokens=max_output_tokens,
            input_tokens=input_tokens,
            messages=messages,
            prompt=prompt,
            min_output_tokens=min_output_tokens,
            priority=priority,
            pool=pool,
            ttl_seconds=ttl_seconds,
            idempotency_key=idempotency_key,
            metadata=metadata,
        )
        waiter = self._waiter(max_wait)
        while True:
            try:
                body = self._send(
                    "POST", "/reservations", with_wait(request.body, waiter), resendable=True
                )
            except QuotaError as error:
                delay = waiter.next_delay(error)
                if delay is None:
                    raise
                log.info("reservation refused (%s); retrying in %.2f s", error.code, delay)
                self._sleep(delay)
                continue
            reservation = Reservation(self, Grant.from_body(body), request.ttl_seconds)
            if reservation.grant.wait_ms:  # scheduled: the call may start once this has passed
                self._sleep(reservation.grant.wait_ms / 1000)
                reservation.started()
            return reservation

    def get(self, reservation_id: str) -> dict[str, Any]:
        return self._send("GET", reservation_path(reservation_id), resendable=True)

    def feature_usage(self, feature: str) -> dict[str, Any]:
        """Every limit on the feature with what is used and left."""
        return self._send("GET", f"/features/{feature}/usage", resendable=True)

    def _waiter(self, max_wait: float | None) -> Waiter:
        policy = self.retry if max_wait is None else replace(self.retry, max_wait=max_wait)
        return Waiter(policy, self.budget, self._rng, self._clock)

    def _send(
        self, method: str, path: str, body: Any = None, *, resendable: bool
    ) -> dict[str, Any]:
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, json=body)
            except httpx.TransportError as exc:
                delay = transport_retry_delay(
                    exc, resendable=resendable, attempt=attempt, budget=self.budget, rng=self._rng
                )
                if delay is None:
                    raise Unreachable(f"The quota server did not answer: {exc!r}") from exc
                self._sleep(delay)
                attempt += 1
                continue
            return decode(response)

    def _commit(self, reservation_id: str, usage: Usage) -> Settlement:
        path = reservation_path(reservation_id, "commit")
        return Settlement.from_body(self._send("POST", path, usage.body(), resendable=True))

    def _release(self, reservation_id: str, refusal: Refusal | None = None) -> Settlement:
        path = reservation_path(reservation_id, "release")
        body = refusal.body() if refusal else {}
        return Settlement.from_body(self._send("POST", path, body, resendable=False))

    def _extend(self, reservation_id: str, ttl_seconds: int) -> datetime | None:
        path = reservation_path(reservation_id, "extend")
        body = self._send("POST", path, {"ttl_seconds": ttl_seconds}, resendable=True)
        return parse_time(body.get("expires_at"))


class Reservation(HeldBase):
    """A held reservation. As a context manager it commits on success (the usage given to
    `record_usage`, or the worst case), releases on an exception, and keeps the lease alive
    in the meantime."""

    def __init__(self, client: QuotaClient, grant: Grant, ttl_seconds: int) -> None:
        super().__init__(grant, ttl_seconds)
        self._client = client
        client._keeper.watch(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        action = self.exit_action(failed=exc is not None)
        try:
            if action == "commit":
                self.commit()
            elif action == "release":
                self.release()
        except QuotaError as error:
            # Raising here would hide the block's own outcome (or its exception); the lease
            # expires on the server and is charged as reserved, which is the safe side.
            log.warning("could not %s reservation %s: %s", action, self.id, error)

    def commit(
        self,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        *,
        cached_input_tokens: int = 0,
        finish_reason: str = "",
        upstream_status: int | None = None,
        latency_ms: int | None = None,
        upstream_headers: Mapping[str, str] | None = None,
    ) -> Settlement:
        """Reports the actual usage; the server refunds the rest at once. Without counts it
        commits what `record_usage` recorded, or else the reserved worst case."""
        usage = self.usage_to_commit(
            input_tokens,
            output_tokens,
            cached_input_tokens,
            finish_reason,
            upstream_status,
            latency_ms,
        )
        if upstream_headers:
            usage = replace(usage, upstream_headers=upstream_headers)
        self._recorded = usage  # a failed commit is tried again on the way out of `with`
        self.settlement = self._client._commit(self.id, usage)
        if self.settlement.lease_expired:
            log.warning("reservation %s had expired before its commit", self.id)
        return self.settlement

    def release(self, refusal: Refusal | None = None) -> Settlement:
        """The call did not happen: everything is refunded. `refusal` says why (a provider
        429, with its rate-limit headers)."""
        self.settlement = self._client._release(self.id, refusal)
        return self.settlement

    def extend(self, ttl_seconds: int | None = None) -> datetime | None:
        """Moves the expiry to now + ttl (the reservation's own ttl by default). The client
        does this by itself while the reservation is held."""
        self.expires_at = self._client._extend(self.id, ttl_seconds or self.ttl_seconds)
        return self.expires_at
