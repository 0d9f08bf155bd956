"""Allotments: the parts of a shared limit that each partition holds, moved toward demand.

On a partitioned store (docs/scale.md) a limit that tenants of several partitions share
holds an allotment on each: whole units of its amount that add up to at most the amount
(allot.lua). Every QUOTA_REBALANCE_SECONDS the rebalancer reads each partition's asks and
moves units toward them, max-min fair: a partition that asks for less than an even share
gets what it asks, the rest share what is left, and capacity nobody asks for is spread
evenly so a partition that starts asking finds some. Units are taken from the partitions
that give them up before any is given to another, so the sum never exceeds the amount, even
when a round stops half-way.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from redis.exceptions import LockError
from redis.lock import Lock

from quotas.engine import Check, Engine
from quotas.engine.core import KeySpace
from quotas.engine.partitions import tenant_partition
from quotas.metrics import ALLOTMENT_MOVED, ALLOTMENT_ROUND, ALLOTMENT_UNITS
from quotas.plan.compiled import Plan
from quotas.plan.infos import LimitInfo

log = logging.getLogger(__name__)

LOCK_MS = 10_000  # a round takes milliseconds; a crashed one frees the lock after this


def allot_targets(amount: int, wants: Sequence[float], floors: Sequence[int]) -> list[int]:
    """Units for each partition: at least its floor (what it uses and cannot give away),
    the rest of `amount` shared by water-filling its wants (units per minute), and what
    nobody wants spread evenly; whole units adding up to `amount` (or to the floors, when
    they alone exceed it)."""
    count = len(wants)
    rest = amount - sum(floors)
    if rest <= 0:
        return list(floors)
    wanted = [max(0.0, w) for w in wants]
    if sum(wanted) <= rest:
        spare = (rest - sum(wanted)) / count
        shares = [w + spare for w in wanted]
    else:
        level = _water_level(wanted, rest)
        shares = [min(w, level) for w in wanted]
    whole = [math.floor(s) for s in shares]
    # the units lost to rounding go to the largest remainders
    by_remainder = sorted(range(count), key=lambda i: shares[i] - whole[i], reverse=True)
    for i in by_remainder[: rest - sum(whole)]:
        whole[i] += 1
    return [f + w for f, w in zip(floors, whole, strict=True)]


def _water_level(wants: list[float], total: float) -> float:
    """The level at which sum(min(want, level)) == total (total < sum(wants))."""
    remaining, left = total, len(wants)
    for want in sorted(wants):
        if want * left >= remaining:
            return remaining / left
        remaining -= want
        left -= 1
    return max(wants)


@dataclass(frozen=True, slots=True)
class Moved:
    limits: int  # split limits looked at
    units: int  # units that changed partition


def allotments_rebalance(engine: Engine, plan: Plan) -> Moved:
    """One round over every split limit of the plan (nothing on one partition)."""
    if not engine.partitioned or not shared_limits(plan):
        return Moved(0, 0)
    now_ms = engine.now_ms_estimate()
    checks = [split_checks(plan, s, now_ms) for s in engine.spaces]
    kept = guarantees_kept(plan, len(engine.spaces))
    return allotments_round(engine, checks, kept=kept, version=plan.version)


def guarantees_kept(plan: Plan, count: int) -> dict[int, list[int]]:
    """Of each pool's capacity limit, the units each partition keeps whatever the asks: the
    guarantees of its tenants' features on that pool and metric, so that a guarantee holds
    even while its feature is quiet and others ask for everything."""
    kept: dict[int, list[int]] = {}
    for limit in shared_limits(plan):
        if not limit.is_pool_capacity or limit.pool_id is None:
            continue
        for guarantee in plan.guarantees.get(limit.pool_id, []):
            tenant = plan.tenant_of(guarantee)
            if guarantee.metric == limit.metric and tenant is not None:
                units = kept.setdefault(limit.id, [0] * count)
                units[tenant_partition(tenant, count)] += guarantee.guaranteed_units
    return kept


def allotments_round(
    engine: Engine,
    checks: list[list[Check]],
    *,
    kept: dict[int, list[int]] | None = None,
    version: int = 0,
) -> Moved:
    """One round: `checks[i]` are the split limits' checks on partition i, in one order;
    `kept[limit id][i]`: units partition i keeps of that limit whatever the asks (its
    features' guarantees); `version`: the plan's. Skipped while another round holds the
    lock, and while a partition lost its data (its version is missing while the plan has one:
    until its rebuild); raises when a partition cannot be read (then nothing moves: the
    allotments stay as they were while a shard fails over)."""
    lock = _lock(engine)
    if not lock.acquire(blocking=False):
        return Moved(0, 0)  # another round is running
    try:
        lost = [s.index for s in engine.spaces if version and not engine.client.exists(s.version)]
        if lost:
            # a partition without its data reads as having used nothing: its budgets' units
            # would be given away before the rebuild restores what it had spent
            log.warning("allotments: no round while partitions %s wait for their rebuild", lost)
            return Moved(0, 0)
        return _round(engine, checks, kept or {})
    finally:
        _release(lock)


def _lock(engine: Engine) -> Lock:
    """The lock that rounds and restores take: one at a time on the allotments. A holder that
    crashed frees it after LOCK_MS."""
    return engine.client.lock(engine.keys.prefix + "allot_lock", timeout=LOCK_MS / 1000)


def _release(lock: Lock) -> None:
    with contextlib.suppress(LockError):  # it expired meanwhile: someone else may hold it
        lock.release()


def _round(engine: Engine, checks: list[list[Check]], kept: dict[int, list[int]]) -> Moved:
    shared = [check.limit_id for check in checks[0]]
    fence = _fence(engine)
    read = {
        space.index: {
            int(r["id"]): r for r in engine.allotments_read(space, checks[space.index], fence=fence)
        }
        for space in engine.spaces
    }
    current: dict[int, list[int]] = {}
    targets: dict[int, list[int]] = {}
    for lid in shared:
        rows = [read[space.index][lid] for space in engine.spaces]
        amount = int(rows[0]["amount"])
        current[lid] = [int(r["units"]) for r in rows]
        floors = [min(int(r["used"]), int(r["units"])) for r in rows]
        if lid in kept:
            floors = [max(f, k) for f, k in zip(floors, kept[lid], strict=True)]
            if sum(floors) > amount:  # guarantees past the capacity: kept in proportion
                floors = [f * amount // sum(floors) for f in floors]
        targets[lid] = allot_targets(amount, [float(r["want"]) for r in rows], floors)
    # first take: every partition that gives units up
    for space in engine.spaces:
        down = {
            lid: targets[lid][space.index]
            for lid in targets
            if targets[lid][space.index] < current[lid][space.index]
        }
        taken = engine.allotments_move(space, checks[space.index], down, fence=fence)
        if taken is None:
            return _superseded(len(shared))
        for lid, units in taken.items():
            current[lid][space.index] = units
    # then give, never past the amount whatever the takes left
    moved = 0
    for space in engine.spaces:
        up = {}
        for lid in shared:
            i = space.index
            free = int(read[0][lid]["amount"]) - sum(current[lid])
            grow = min(targets[lid][i] - current[lid][i], free)
            if grow > 0:
                up[lid] = current[lid][i] + grow
                current[lid][i] += grow  # counted before it lands: the sum stays bounded
                moved += grow
        if engine.allotments_move(space, checks[space.index], up, fence=fence) is None:
            return _superseded(len(shared))
    for lid in shared:
        for index, units in enumerate(current[lid]):
            ALLOTMENT_UNITS.labels(str(lid), str(index)).set(units)
    ALLOTMENT_MOVED.inc(moved)
    ALLOTMENT_ROUND.set_to_current_time()
    return Moved(len(shared), moved)


def _fence(engine: Engine) -> int:
    """A number for a round, higher than every earlier round's (see allot_move.lua: a
    partition refuses the moves of a round older than the last it saw)."""
    return int(engine.client.incr(engine.keys.prefix + "allot_fence"))


def _superseded(limits: int) -> Moved:
    """A round that stalled past its lock while a newer one ran stops where it is: what it
    took stays taken (the sum only lower), and it gives nothing."""
    log.warning("allotments: a round stopped, a newer one has run since it began")
    return Moved(limits, 0)


def shared_limits(plan: Plan) -> list[LimitInfo]:
    """The limits that tenants share (split on a partitioned store), but guarantees."""
    return [
        limit
        for limit in plan.limits.values()
        if limit.tenant_id is None and limit.feature_id is None and limit.amount is not None
    ]


def split_checks(plan: Plan, space: KeySpace, now_ms: int) -> list[Check]:
    """The checks of every split limit on one partition, in `shared_limits` order."""
    return [plan.inspection_check(limit, space, now_ms) for limit in shared_limits(plan)]


def allotments_restore(engine: Engine, space: KeySpace, checks: list[Check]) -> None:
    """After a partition lost its data: each shared limit's units there are what the other
    partitions leave of the amount (their stored units, or their even split), not the even
    split a missing allotment reads as, which could add up past the amount until the next
    round. `checks`: the shared limits' checks on that partition (`split_checks`)."""
    if not engine.partitioned:
        return
    lock = _lock(engine)
    # under the rounds' lock, so that no round gives units between these reads and the write
    if not lock.acquire(blocking=True, blocking_timeout=LOCK_MS / 1000 + 1):
        log.warning("allotments: restoring partition %s without the rounds' lock", space.index)
    try:
        units = {}
        for check in checks:
            amount = check.rate or check.cap
            others = 0
            for other in engine.spaces:
                if other is not space:
                    raw = engine.client.hget(other.allot, str(check.limit_id))
                    others += _units(raw, amount, other)
            units[check.limit_id] = max(0, amount - others)
        engine.allotments_move(space, checks, units)
    finally:
        _release(lock)


def _units(raw: bytes | str | None, amount: int, space: KeySpace) -> int:
    """A partition's units of `amount` as allot.lua reads them (allot_units)."""
    if raw is None:
        return amount // space.count + (1 if space.index < amount % space.count else 0)
    text = raw.decode() if isinstance(raw, bytes) else raw
    held, _, of = text.partition(":")
    if int(of) == amount:
        return int(held)
    if int(of) <= 0:
        return _units(None, amount, space)
    return min(int(held), int(held) * amount // int(of))
