"""Keeps held leases alive while their calls run: long calls and streams outlive a short
ttl, and an expired lease is charged in full and frees its slot for someone else.

One daemon thread per client serves every lease of that client, so a thousand concurrent
calls cost one thread, not a thousand. It holds leases by weak reference: a reservation its
caller dropped without settling stops being extended, and the server's reaper expires it."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol

from ._errors import Conflict, NotFound, QuotaError

log = logging.getLogger("quotaclient")

# A lease is extended each time a third of its ttl has passed, so two extensions in a row
# may fail (a slow or restarting server) before it runs out.
EXTEND_EVERY = 1 / 3


class Lease(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def ttl_seconds(self) -> int: ...

    @property
    def settled(self) -> bool: ...

    def extend(self, ttl_seconds: int | None = None) -> object: ...


def interval_of(ttl_seconds: int) -> float:
    return max(0.05, ttl_seconds * EXTEND_EVERY)


def gives_up(error: QuotaError) -> bool:
    """A lease that is gone (settled, expired, unknown) is not worth another try."""
    return isinstance(error, Conflict | NotFound)


class LeaseKeeper:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._due: list[tuple[float, int, weakref.ref[Lease]]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def watch(self, lease: Lease) -> None:
        with self._wake:
            self._schedule(lease)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="quotaclient-lease-keeper", daemon=True
                )
                self._thread.start()
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _schedule(self, lease: Lease) -> None:
        due = self._clock() + interval_of(lease.ttl_seconds)
        heapq.heappush(self._due, (due, next(self._order), weakref.ref(lease)))

    def _run(self) -> None:
        while True:
            lease = self._next_due()
            if lease is None:
                return
            self._extend(lease)

    def _next_due(self) -> Lease | None:
        """Waits for the next lease to extend; None when stopped."""
        with self._wake:
            while not self._stopped:
                if not self._due:
                    self._wake.wait()
                    continue
                due, _, ref = self._due[0]
                wait = due - self._clock()
                if wait > 0:
                    self._wake.wait(timeout=wait)
                    continue
                heapq.heappop(self._due)
                lease = ref()
                if lease is not None and not lease.settled:
                    return lease
            return None

    def _extend(self, lease: Lease) -> None:
        try:
            lease.extend()
        except QuotaError as error:
            if lease.settled:
                return  # settled while the extension was on its way
            log.warning("could not extend reservation %s: %s", lease.id, error)
            if gives_up(error):
                return
        except Exception:
            log.exception("could not extend reservation %s", lease.id)
        with self._wake:
            if not lease.settled and not self._stopped:
                self._schedule(lease)
