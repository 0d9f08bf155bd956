"""The asyncio client: the same calls as the sync one, with the lease kept alive by a task
while the call runs."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from types import TracebackType
from typing import Any

import httpx

from ._errors import QuotaError, Unreachable
from ._held import HeldBase
from ._keeper import gives_up, interval_of
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


class AsyncQuotaClient:
    """The asyncio twin of `QuotaClient`; `sleep` is awaited between retries."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        budget: RetryBudget | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.budget = budget or RetryBudget()
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._http = httpx.AsyncClient(
            base_url=base_url_of(base_url), headers=headers_of(api_key), timeout=timeout
        )

    async def __aenter__(self) -> AsyncQuotaClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

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
    ) -> ReserveCall:
        """As `QuotaClient.reserve`. Use `await client.reserve(...)` or
        `async with client.reserve(...) as reservation:`."""
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
        return ReserveCall(lambda: self._reserve(request.body, request.ttl_seconds, max_wait))

    async def _reserve(
        self, body: dict[str, Any], ttl_seconds: int, max_wait: float | None
    ) -> AsyncReservation:
        waiter = self._waiter(max_wait)
        while True:
            try:
                granted = await self._send(
                    "POST", "/reservations", with_wait(body, waiter), resendable=True
                )
            except QuotaError as error:
                delay = waiter.next_delay(error)
                if delay is None:
                    raise
                log.info("reservation refused (%s); retrying in %.2f s", error.code, delay)
                await self._sleep(delay)
                continue
            reservation = AsyncReservation(self, Grant.from_body(granted), ttl_seconds)
            if reservation.grant.wait_ms:  # scheduled: the call may start once this has passed
                await self._sleep(reservation.grant.wait_ms / 1000)
                reservation.started()
            return reservation

    async def get(self, reservation_id: str) -> dict[str, Any]:
        return await self._send("GET", reservation_path(reservation_id), resendable=True)

    async def feature_usage(self, feature: str) -> dict[str, Any]:
        return await self._send("GET", f"/features/{feature}/usage", resendable=True)

    def _waiter(self, max_wait: float | None) -> Waiter:
        policy = self.retry if max_wait is None else replace(self.retry, max_wait=max_wait)
        return Waiter(policy, self.budget, self._rng, self._clock)

    async def _send(
        self, method: str, path: str, body: Any = None, *, resendable: bool
    ) -> dict[str, Any]:
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, json=body)
            except httpx.TransportError as exc:
                delay = transport_retry_delay(
                    exc, resendable=resendable, attempt=attempt, budget=self.budget, rng=self._rng
                )
                if delay is None:
                    raise Unreachable(f"The quota server did not answer: {exc!r}") from exc
                await self._sleep(delay)
                attempt += 1
                continue
            return decode(response)

    async def _commit(self, reservation_id: str, usage: Usage) -> Settlement:
        path = reservation_path(reservation_id, "commit")
        return Settlement.from_body(await self._send("POST", path, usage.body(), resendable=True))

    async def _release(self, reservation_id: str, refusal: Refusal | None = None) -> Settlement:
        path = reservation_path(reservation_id, "release")
        body = refusal.body() if refusal else {}
        return Settlement.from_body(await self._send("POST", path, body, resendable=False))

    async def _extend(self, reservation_id: str, ttl_seconds: int) -> datetime | None:
        path = reservation_path(reservation_id, "extend")
        body = await self._send("POST", path, {"ttl_seconds": ttl_seconds}, resendable=True)
        return parse_time(body.get("expires_at"))


class ReserveCall:
    """What `AsyncQuotaClient.reserve` returns: awaitable, and an async context manager.
    Nothing is sent until it is awaited or entered."""

    def __init__(self, start: Callable[[], Awaitable[AsyncReservation]]) -> None:
        self._start = start
        self._reservation: AsyncReservation | None = None

    def __await__(self) -> Generator[Any, None, AsyncReservation]:
        return self._start().__await__()

    async def __aenter__(self) -> AsyncReservation:
        self._reservation = await self._start()
        return self._reservation

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._reservation is not None
        await self._reservation.__aexit__(exc_type, exc, tb)


class AsyncReservation(HeldBase):
    """A held reservation; see `Reservation`. Its lease is kept alive by a task."""

    def __init__(self, client: AsyncQuotaClient, grant: Grant, ttl_seconds: int) -> None:
        super().__init__(grant, ttl_seconds)
        self._client = client
        self._keeper = asyncio.get_running_loop().create_task(
            _keep_alive(weakref.ref(self), self.id, ttl_seconds),
            name=f"quotaclient-keep-{self.id}",
        )

    async def __aenter__(self) -> AsyncReservation:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        action = self.exit_action(failed=exc is not None)
        try:
            if action == "commit":
                await self.commit()
            elif action == "release":
                await self.release()
        except QuotaError as error:
            # As in the sync client: the lease expires and is charged as reserved.
            log.warning("could not %s reservation %s: %s", action, self.id, error)

    async def commit(
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
        self._recorded = usage
        self.settlement = await self._client._commit(self.id, usage)
        self._keeper.cancel()
        if self.settlement.lease_expired:
            log.warning("reservation %s had expired before its commit", self.id)
        return self.settlement

    async def release(self, refusal: Refusal | None = None) -> Settlement:
        self.settlement = await self._client._release(self.id, refusal)
        self._keeper.cancel()
        return self.settlement

    async def extend(self, ttl_seconds: int | None = None) -> datetime | None:
        self.expires_at = await self._client._extend(self.id, ttl_seconds or self.ttl_seconds)
        return self.expires_at


async def _keep_alive(ref: weakref.ref[AsyncReservation], rid: str, ttl_seconds: int) -> None:
    """Extends the lease every third of its ttl until it is settled. It holds the reservation
    only weakly between extensions: one its caller dropped unsettled is left to expire."""
    while True:
        await asyncio.sleep(interval_of(ttl_seconds))
        reservation = ref()
        if reservation is None or reservation.settled:
            return
        try:
            await reservation.extend()
        except QuotaError as error:
            if reservation.settled:
                return
            log.warning("could not extend reservation %s: %s", rid, error)
            if gives_up(error):
                return
        except Exception:
            log.exception("could not extend reservation %s", rid)
        del reservation
