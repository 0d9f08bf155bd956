"""Calls let through while the quota server could not be reached (`Quota(on_unreachable=
"allow")`), and their usage reported once it answers again.

A call let through holds no reservation: it stands in for one (`Offline`), and what the call
used goes to a bounded backlog in memory. The next call that gets a reservation replays the
backlog first: each entry is reserved (exactly its usage, under an idempotency key of its
own, so a replay cut short is not counted twice) and committed at once. A replay refused (a
limit is short now) or unanswered stays in the backlog for the next time. The backlog lives
in the process: entries still in it when the process ends are lost, and when it is full the
oldest entry is dropped, with a warning each time."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._errors import QuotaError, Refused
from ._types import Refusal, Usage

if TYPE_CHECKING:
    from ._async import AsyncQuotaClient
    from ._calls import Plan
    from ._sync import QuotaClient

log = logging.getLogger("quotaclient")


@dataclass(frozen=True)
class Unreported:
    """The usage of one call let through, waiting to be reported."""

    feature: str
    model: str
    usage: Usage
    options: dict[str, Any]  # priority, pool, metadata of the reservation it would have made
    key: str = field(default_factory=lambda: f"unreported-{uuid.uuid4().hex}")

    def reserve_args(self) -> dict[str, Any]:
        return {
            "input_tokens": self.usage.input_tokens,
            "max_output_tokens": self.usage.output_tokens,
            "idempotency_key": self.key,
            **self.options,
        }


class Backlog:
    """Thread-safe, bounded, oldest first."""

    def __init__(self, size: int) -> None:
        self._entries: deque[Unreported] = deque()
        self._size = size
        self._lock = threading.Lock()
        self._replaying = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: Unreported) -> None:
        with self._lock:
            if len(self._entries) >= self._size:
                lost = self._entries.popleft()
                log.warning("usage backlog full: the usage of a %s call is lost", lost.feature)
            self._entries.append(entry)

    def _next(self) -> Unreported | None:
        with self._lock:
            return self._entries[0] if self._entries else None

    def _done(self, entry: Unreported) -> None:
        with self._lock:
            if self._entries and self._entries[0] is entry:
                self._entries.popleft()

    def replay(self, client: QuotaClient) -> None:
        """Reports what it holds, oldest first, until the server refuses or does not answer.
        One thread replays at a time; the others go on with their own calls."""
        if not self._entries or not self._replaying.acquire(blocking=False):
            return
        try:
            while (entry := self._next()) is not None:
                try:
                    held = client.reserve(entry.feature, entry.model, **entry.reserve_args())
                    held.commit(**_commit_args(entry.usage))
                except QuotaError as error:
                    if _kept(entry, error):
                        return
                self._done(entry)
        finally:
            self._replaying.release()

    async def replay_async(self, client: AsyncQuotaClient) -> None:
        if not self._entries or not self._replaying.acquire(blocking=False):
            return
        try:
            while (entry := self._next()) is not None:
                try:
                    held = await client.reserve(entry.feature, entry.model, **entry.reserve_args())
                    await held.commit(**_commit_args(entry.usage))
                except QuotaError as error:
                    if _kept(entry, error):
                        return
                self._done(entry)
        finally:
            self._replaying.release()


def _commit_args(usage: Usage) -> dict[str, Any]:
    return dataclasses.asdict(usage)


def _kept(entry: Unreported, error: QuotaError) -> bool:
    """Whether an entry whose replay failed stays for the next time: yes when the server was
    out of reach or a limit is short now; no when it can never be recorded (its feature or
    model is gone, say)."""
    if isinstance(error, Refused):
        return True
    log.warning("the usage of a %s call cannot be reported: %s", entry.feature, error)
    return False


def input_estimate(call: Plan) -> int:
    """A rough count of the call's input tokens (four characters a token), for a stream that
    ends before the provider reports its own."""
    return sum(len(str(message)) for message in call.messages) // 4


class Offline:
    """Stands in for the reservation of a call let through: its commit goes to the backlog,
    its release drops it (the call did not happen)."""

    def __init__(self, feature: str, call: Plan, backlog: Backlog, options: dict[str, Any]):
        self.id = "unreserved"
        self.input_tokens = input_estimate(call)
        self.output_tokens = call.max_output_tokens
        self._feature, self._model = feature, call.model
        self._backlog, self._options = backlog, options
        self._started = time.monotonic()

    def commit(self, **usage: Any) -> None:
        known = {f.name: usage[f.name] for f in dataclasses.fields(Usage) if f.name in usage}
        self._backlog.add(Unreported(self._feature, self._model, Usage(**known), self._options))

    def release(self, refusal: Refusal | None = None) -> None:
        """Nothing to report: the call did not happen (nor, unreported, its refusal)."""
        return None


class AsyncOffline(Offline):
    async def commit(self, **usage: Any) -> None:  # type: ignore[override]
        Offline.commit(self, **usage)

    async def release(self, refusal: Refusal | None = None) -> None:  # type: ignore[override]
        return None
