"""Fail-open admission while the store is down, and the events it owes the ledger.

A pool with `fail_mode: open` keeps admitting when Redis is unreachable: the reservation is
marked degraded (a header and a field), nothing is enforced, and its events wait in this
process's spool until Redis answers again: the next decision that reaches the store writes
them, and a thread of the process tries every DRAIN_SECONDS meanwhile, so they never wait for
traffic. The spool is bounded: an outage that outlasts it loses the oldest events, and says so
in the log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import RedisClusterException

from quotas.engine import (
    Engine,
    Granted,
    LeaseView,
    Missing,
    Owner,
    ReserveCall,
    Settled,
    Usage,
)
from quotas.plan import Plan, features_by_id, pool_by_id

log = logging.getLogger(__name__)
DEGRADED_PREFIX = "rsv_d_"
SIGNATURE_CHARS = 16
SPOOL_LIMIT = 100_000
DRAIN_SECONDS = 1.0

_spool: deque[dict[str, Any]] = deque(maxlen=SPOOL_LIMIT)
_lock = threading.Lock()
_drainer: threading.Thread | None = None


@dataclass(frozen=True, slots=True)
class Subject:
    """What a degraded reservation was for, as its id says: feature, pool and model ids (the
    pool and model are None in ids made before they were carried)."""

    feature_id: int
    pool_id: int | None
    model_id: int | None


def degraded_id(*, tenant_id: int, subject: Subject, nonce: str, secret: str) -> str:
    """A degraded reservation has no lease, so its id carries what it was for (feature, pool,
    model) and a proof of that and of its tenant: its commit can then be attributed and
    priced by the ledger even when it reaches the stream before, or without, its
    reservation's event (each process spools its own)."""
    text = f"{subject.feature_id}.{subject.pool_id}.{subject.model_id}"
    return f"{DEGRADED_PREFIX}{text}-{nonce}{_signature(tenant_id, text, nonce, secret)}"


def is_degraded_id(reservation_id: str) -> bool:
    return reservation_id.startswith(DEGRADED_PREFIX)


def degraded_subject(reservation_id: str, *, owner: Owner, secret: str) -> Subject | None:
    """What a degraded id names, when the id is genuine and the caller (its tenant, a narrowed
    key's features) may act on it; None otherwise."""
    text, _, body = reservation_id.removeprefix(DEGRADED_PREFIX).partition("-")
    nonce, signature = body[:-SIGNATURE_CHARS], body[-SIGNATURE_CHARS:]
    parts = text.split(".")
    if (
        len(parts) not in (1, 3)
        or not all(part.isascii() and part.isdigit() for part in parts)  # not "²"
        or not nonce
        or len(signature) != SIGNATURE_CHARS
    ):
        return None
    numbers = [int(part) for part in parts]
    if owner.feature_ids and numbers[0] not in owner.feature_ids:
        return None
    if not hmac.compare_digest(signature, _signature(owner.tenant_id, text, nonce, secret)):
        return None
    if len(numbers) == 1:
        return Subject(feature_id=numbers[0], pool_id=None, model_id=None)
    return Subject(feature_id=numbers[0], pool_id=numbers[1], model_id=numbers[2])


def _signature(tenant_id: int, subject: str, nonce: str, secret: str) -> str:
    message = f"{tenant_id}:{subject}:{nonce}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()[:SIGNATURE_CHARS]


def subject_slugs(plan: Plan, tenant_id: int, subject: Subject) -> dict[str, str]:
    """The tenant, feature, pool and model slugs of a degraded reservation, as its usage
    events name them; those the plan no longer has are left out."""
    tenant = plan.tenants.get(tenant_id)
    feature = features_by_id(plan).get(subject.feature_id)
    pool = pool_by_id(plan, subject.pool_id)
    model = (
        next((m for m in pool.models.values() if m.id == subject.model_id), None) if pool else None
    )
    slugs = {
        "tenant": tenant.slug if tenant else "",
        "feature": feature.slug if feature else "",
        "pool": pool.slug if pool else "",
        "model": model.name if model else "",
    }
    return {name: slug for name, slug in slugs.items() if slug}


def spool_event(event: dict[str, Any]) -> None:
    with _lock:
        if len(_spool) == SPOOL_LIMIT:
            log.error("degraded-event spool is full; the oldest event is dropped")
        _spool.append({k: str(v) for k, v in event.items()})


def spool_size() -> int:
    return len(_spool)


def spool_flush(client: redis.Redis, stream: str, maxlen: int) -> int:
    """Write the spooled events to the stream, in one pipeline; keep them if that fails."""
    with _lock:
        events = list(_spool)
        _spool.clear()
    if not events:
        return 0
    try:
        pipe = client.pipeline(transaction=False)
        for event in events:
            pipe.xadd(stream, event, maxlen=maxlen or None, approximate=True)  # type: ignore[arg-type]
        pipe.execute()
    except BaseException:  # whatever stopped the write, the events stay owed
        with _lock:
            _spool.extendleft(reversed(events))
        raise
    return len(events)


def spool_drain(engine: Engine) -> None:
    """Write what the spool holds once the store answers; keep it while it does not."""
    if spool_size():
        try:
            spool_flush(engine.client, engine.keys.events, engine.stream_maxlen)
        except (redis.RedisError, RedisClusterException):
            log.warning("degraded events still waiting for the store", exc_info=True)


def drain_in_background(engine_of: Callable[[], Engine]) -> None:
    """Make sure a thread of this process drains the spool every DRAIN_SECONDS until it is
    empty (one thread at most; `engine_of` is asked each time, so it follows the app's)."""
    global _drainer
    with _lock:
        if _drainer is None:
            _drainer = threading.Thread(
                target=_drain_until_empty, args=(engine_of,), name="degraded-spool", daemon=True
            )
            _drainer.start()


def _drain_until_empty(engine_of: Callable[[], Engine]) -> None:
    global _drainer
    while True:
        time.sleep(DRAIN_SECONDS)
        try:
            spool_drain(engine_of())
        except Exception:
            log.exception("draining the degraded-event spool failed")
        with _lock:  # an event spooled after this check starts a thread of its own
            if not _spool:
                _drainer = None
                return


def degraded_admit(
    *, engine: Engine, call: ReserveCall, pool_slug: str, subject: Subject, secret: str
) -> Granted:
    """Admit a reservation unenforced: the store is down and its pool fails open."""
    now = engine.now_ms_estimate()
    reservation_id = degraded_id(
        tenant_id=call.tenant_id,
        subject=subject,
        nonce=call.reservation_id.removeprefix("rsv_"),
        secret=secret,
    )
    cost = call.cost_fixed + math.ceil(call.cost_per_output * call.max_output_tokens)
    spool_event(
        {
            **call.meta,
            "type": "reserved",
            "rid": reservation_id,
            "at_ms": now,
            "expires_ms": now + call.ttl_ms,  # the ledger expires it then: no reaper will
            "pool": pool_slug,
            "degraded": 1,
            "reserved_input_tokens": call.input_tokens,
            "reserved_output_tokens": call.max_output_tokens,
            "reserved_cost_nusd": cost,
        }
    )
    return Granted(
        reservation_id=reservation_id,
        pool=pool_slug,
        output_tokens=call.max_output_tokens,
        cost_nusd=cost,
        expires_ms=now + call.ttl_ms,
        now_ms=now,
        limits=(),
        would_refuse=(),
        degraded=True,
    )


def degraded_settle(
    *,
    engine: Engine,
    plan: Plan,
    owner: Owner,
    key_prefix: str,
    reservation_id: str,
    outcome: str,
    usage: Usage,
    secret: str,
) -> Settled | Missing:
    """A degraded reservation has no lease to settle: its usage is recorded as reported, with
    what the reservation was for, so that the ledger can attribute and price it alone."""
    subject = degraded_subject(reservation_id, owner=owner, secret=secret)
    if subject is None:
        return Missing()
    spool_event(
        {
            **subject_slugs(plan, owner.tenant_id, subject),
            "type": outcome,
            "rid": reservation_id,
            "key": key_prefix,
            "degraded": 1,
            "at_ms": engine.now_ms_estimate(),
            "input_tokens": usage.input_tokens,
            "cached_input_tokens": usage.cached_input_tokens,
            "output_tokens": usage.output_tokens,
            **usage.extra,
        }
    )
    spool_drain(engine)
    result = {
        "id": reservation_id,
        "status": outcome,
        "lease_expired": False,
        "input_tokens": usage.input_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "output_tokens": usage.output_tokens,
        "cost_nusd": 0,
        "refunded": {},
        "degraded": True,
    }
    return Settled(result=result)


def degraded_lease(
    *, engine: Engine, owner: Owner, reservation_id: str, ttl_ms: int, secret: str
) -> LeaseView | Missing:
    """A degraded reservation holds nothing to extend; a long call may go on regardless."""
    if degraded_subject(reservation_id, owner=owner, secret=secret) is None:
        return Missing()
    now = engine.now_ms_estimate()
    data = {
        "id": reservation_id,
        "st": "held",
        "created": now,
        "e": now + ttl_ms,
        "meta": {"degraded": 1},
        "r": {},
    }
    return LeaseView(data=data, now_ms=now)
