"""Anthropic's `messages.stream()` helper, protected. Its manager sends the request only when
entered, so the reservation is made then too: a manager that is built and never entered
reserves nothing. On the way out, the usage is read from the message the helper
accumulated."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from . import _anthropic
from ._async import AsyncReservation
from ._calls import settle, settle_async
from ._fit import Fit, unchanged
from ._offline import AsyncOffline, Offline
from ._quota import Quota, admit, admit_async
from ._sync import Reservation


class StreamManager:
    def __init__(
        self,
        quota: Quota,
        open_stream: Callable[..., Any],
        kwargs: dict[str, Any],
        fit: Fit = unchanged,
    ):
        self._quota = quota
        self._fit = fit
        self._open_stream = open_stream
        self._kwargs = kwargs
        self._reservation: Reservation | Offline | None = None
        self._manager: Any = None
        self._stream: Any = None
        self._started = 0.0

    def __enter__(self) -> Any:
        call = _anthropic.plan(
            self._kwargs, self._quota.max_output_tokens, self._quota.default_output_tokens
        )
        self._reservation = admit(self._quota, call, self._fit)
        self._started = time.monotonic()
        try:
            prepared = _anthropic.prepare(self._kwargs, call, self._reservation.output_tokens)
            self._manager = self._open_stream(**prepared)
            self._stream = self._manager.__enter__()
        except BaseException as error:
            settle(self._reservation, None, error, self._started)
            raise
        return self._stream

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._reservation is not None
        try:
            self._manager.__exit__(exc_type, exc, tb)
        finally:
            report = _anthropic.snapshot_report(self._stream)
            settle(self._reservation, report, exc, self._started)


class AsyncStreamManager:
    def __init__(
        self,
        quota: Quota,
        open_stream: Callable[..., Any],
        kwargs: dict[str, Any],
        fit: Fit = unchanged,
    ):
        self._quota = quota
        self._fit = fit
        self._open_stream = open_stream
        self._kwargs = kwargs
        self._reservation: AsyncReservation | AsyncOffline | None = None
        self._manager: Any = None
        self._stream: Any = None
        self._started = 0.0

    async def __aenter__(self) -> Any:
        call = _anthropic.plan(
            self._kwargs, self._quota.max_output_tokens, self._quota.default_output_tokens
        )
        self._reservation = await admit_async(self._quota, call, self._fit)
        self._started = time.monotonic()
        try:
            prepared = _anthropic.prepare(self._kwargs, call, self._reservation.output_tokens)
            self._manager = self._open_stream(**prepared)
            self._stream = await self._manager.__aenter__()
        except BaseException as error:
            await settle_async(self._reservation, None, error, self._started)
            raise
        return self._stream

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._reservation is not None
        try:
            await self._manager.__aexit__(exc_type, exc, tb)
        finally:
            report = _anthropic.snapshot_report(self._stream)
            await settle_async(self._reservation, report, exc, self._started)
