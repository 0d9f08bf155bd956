"""When the store lost its data: one rebuild, and the reservations the ledger still knows.

The engine's scripts answer `Lost` while the store's config version key is gone and the plan
has a version (`plan_check` in quotas/lua/lib.lua): every counter would read zero, so nothing
is decided. The first process to see it takes a lock (SET NX PX) and starts the rebuild, so
that processes seeing the loss at once start one; the lock expires, so a rebuild whose worker
died is started again by a later decision. The rebuild and the ledger lookup are the
ledger's, registered here when its app is ready (quotas imports no ledger).

On a partitioned store each partition has its own version, lock and rebuild mark: a shard
that lost its data loses the versions of its partitions only, and only those are rebuilt (the
rebuild looks for the partitions whose version is gone); the others keep deciding.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import redis

from quotas.engine import Owner
from quotas.engine.core import KeySpace
from quotas.engine.types import LeaseRestore
from quotas.store import get_engine

log = logging.getLogger(__name__)
REBUILD_LOCK_MS = 60_000

RebuildStart = Callable[[], None]
# (reservation id, owner, made before this Redis time in ms)
LeaseFinder = Callable[[str, Owner, int], LeaseRestore | None]


class _Hooks:
    rebuild_start: RebuildStart | None = None
    lease_finder: LeaseFinder | None = None


def recovery_register(*, rebuild_start: RebuildStart, lease_finder: LeaseFinder) -> None:
    _Hooks.rebuild_start = rebuild_start
    _Hooks.lease_finder = lease_finder


def store_lost(space: KeySpace | None = None) -> None:
    """Start the rebuild of the partitions that lost their data (`space`, or every one whose
    version is gone), unless another process already has. The lock taken is that of the first
    partition lost, so that processes seeing the same loss at once start one rebuild; the
    rebuild restores every partition it finds without a version."""
    engine = get_engine()
    holder = f"{socket.gethostname()}-{os.getpid()}"
    try:
        candidates = [space] if space is not None else list(engine.spaces)
        lost = [c for c in candidates if not engine.client.exists(c.version)]
        if not lost:
            return  # the decision that saw the loss raced a rebuild that has just finished
        gate = lost[0]
        if not engine.client.set(gate.rebuild_lock, holder, nx=True, px=REBUILD_LOCK_MS):
            return
        if engine.client.exists(gate.version):
            # the decision that saw the loss raced a rebuild that has just finished
            rebuild_lock_release(gate)
            return
    except redis.RedisError:
        log.warning("could not take the rebuild lock", exc_info=True)
        return
    named = (
        "" if not engine.partitioned else f" (partitions {','.join(str(s.index) for s in lost)})"
    )
    log.error("the quota store lost its data%s; starting its rebuild from the ledger", named)
    try:
        if _Hooks.rebuild_start is None:
            raise RuntimeError("no rebuild registered (is the ledger app installed?)")
        _Hooks.rebuild_start()
    except Exception:
        # the next decision tries again, rather than every one waiting for the lock to expire
        log.exception("could not start the rebuild of the quota store")
        rebuild_lock_release(gate)


def rebuild_lock_release(space: KeySpace | None = None) -> None:
    """Free a partition's rebuild lock (the home partition's by default)."""
    engine = get_engine()
    engine.client.delete((space or engine.keys).rebuild_lock)


def rebuild_mark(space: KeySpace | None = None) -> None:
    """Note when a partition (the home one by default) was rebuilt (Redis time, in ms), for
    lease_restore."""
    engine = get_engine()
    engine.client.set((space or engine.keys).rebuilt_at, engine.now_ms())


def lease_restore(reservation_id: str, owner: Owner) -> bool:
    """Write back the lease of a reservation that the store lost and the ledger still has
    (held, or expired and still committable), so that it can be committed: True if there is
    one now. Only a reservation made before the store's last rebuild can be one it lost; any
    other that is missing was settled and its record has expired (restored from a ledger that
    lags, it would be settled twice) or never existed. A store never rebuilt restores none,
    and asks the ledger nothing. The store here is the reservation's partition (its id names
    it): its last rebuild, its leases."""
    finder = _Hooks.lease_finder
    engine = get_engine()
    space = engine.reservation_space(reservation_id)
    rebuilt_at = engine.client.get(space.rebuilt_at) if finder else None
    if finder is None or rebuilt_at is None:
        return False
    lease = finder(reservation_id, owner, int(rebuilt_at))
    if lease is None:
        return False
    engine.rebuild([], [lease], space=space)  # written only where none exists
    return True
