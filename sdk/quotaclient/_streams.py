"""Provider streams, passed through to the caller item by item, and settled once they end:
on their last item, on an error, or when the caller closes them early."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from ._calls import Report, Tracker

Finish = Callable[[Report, BaseException | None], None]
AsyncFinish = Callable[[Report, BaseException | None], Awaitable[None]]


class ProtectedStream:
    """Iterates like the provider's stream and answers every other attribute (`response`,
    ...) from it."""

    def __init__(self, stream: Any, tracker: Tracker, finish: Finish) -> None:
        self._stream = stream
        self._items: Iterator[Any] = iter(stream)
        self._tracker = tracker
        self._finish: Finish | None = finish

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __iter__(self) -> ProtectedStream:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                item = next(self._items)
            except StopIteration:
                self._end(None)
                raise
            except BaseException as error:
                self._end(error)
                raise
            if self._tracker.observe(item):
                return item

    def __enter__(self) -> ProtectedStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._end(None)

    def _end(self, error: BaseException | None) -> None:
        finish, self._finish = self._finish, None
        if finish is not None:
            finish(self._tracker.report(), error)


class AsyncProtectedStream:
    """The asyncio twin of `ProtectedStream`."""

    def __init__(self, stream: Any, tracker: Tracker, finish: AsyncFinish) -> None:
        self._stream = stream
        self._items: AsyncIterator[Any] = stream.__aiter__()
        self._tracker = tracker
        self._finish: AsyncFinish | None = finish

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __aiter__(self) -> AsyncProtectedStream:
        return self

    async def __anext__(self) -> Any:
        while True:
            try:
                item = await self._items.__anext__()
            except StopAsyncIteration:
                await self._end(None)
                raise
            except BaseException as error:
                await self._end(error)
                raise
            if self._tracker.observe(item):
                return item

    async def __aenter__(self) -> AsyncProtectedStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            await self._stream.close()
        finally:
            await self._end(None)

    async def _end(self, error: BaseException | None) -> None:
        finish, self._finish = self._finish, None
        if finish is not None:
            await finish(self._tracker.report(), error)
