"""Fail-open admission while the store is down, and the events it owes the ledger.

A pool with `fail_mode: open` keeps admitting when Redis is unreachable: the reservation is
marked degraded (a header and a field), nothing is enforced, and its events wait in this
process's spool until Redis answers again. The spool is bounded: an outage that outlasts it
loses the oldest events, and says so in the log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import threading
from collections import deque
from typing import Any

import redis

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

log = logging.getLogger(__name__)
DEGRADED_PREFIX = "rsv_d_"
SIGNATURE_CHARS = 16
SPOOL_LIMIT = 100_000

_spool: deque[dict[str, Any]] = deque(maxlen=SPOOL_LIMIT)
_lock = threading.Lock()


def degraded_id(*, tenant_id: int, feature_id: int, nonce: str, secret: str) -> str:
    """A degraded reservation has no lease, so its id carries its feature and a proof of
    its tenant and feature."""
    signature = _signature(tenant_id, feature_id, nonce, secret)
    return f"{DEGRADED_PREFIX}{feature_id}-{nonce}{signature}"


def is_degraded_id(reservation_id: str) -> bool:
    return reservation_id.startswith(DEGRADED_PREFIX)


def degraded_id_belongs(reservation_id: str, *, owner: Owner, secret: str) -> bool:
    """Whether the id is genuine and the caller (its tenant, a narrowed key's features) may
    act on it."""
    feature, _, body = reservation_id.removeprefix(DEGRADED_PREFIX).partition("-")
    nonce, signature = body[:-SIGNATURE_CHARS], body[-SIGNATURE_CHARS:]
    if not feature.isdigit() or not nonce or len(signature) != SIGNATURE_CHARS:
        return False
    if owner.feature_ids and int(feature) not in owner.feature_ids:
        return False
    expected = _signature(owner.tenant_id, int(feature), nonce, secret)
    return hmac.compare_digest(signature, expected)


def _signature(tenant_id: int, feature_id: int, nonce: str, secret: str) -> str:
    message = f"{tenant_id}:{feature_id}:{nonce}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()[:SIGNATURE_CHARS]


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
    except redis.RedisError:
        with _lock:
            _spool.extendleft(reversed(events))
        raise
    return len(events)


def degraded_admit(*, engine: Engine, call: ReserveCall, pool_slug: str, secret: str) -> Granted:
    """Admit a reservation unenforced: the store is down and its pool fails open."""
    now = engine.now_ms_estimate()
    reservation_id = degraded_id(
        tenant_id=call.tenant_id,
        feature_id=call.feature_id,
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
    owner: Owner,
    key_prefix: str,
    reservation_id: str,
    outcome: str,
    usage: Usage,
    secret: str,
) -> Settled | Missing:
    """A degraded reservation has no lease to settle: its usage is recorded as reported."""
    if not degraded_id_belongs(reservation_id, owner=owner, secret=secret):
        return Missing()
    spool_event(
        {
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
    if not degraded_id_belongs(reservation_id, owner=owner, secret=secret):
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


def spool_drain(engine: Engine) -> None:
    """Write what the spool holds once the store answers; keep it while it does not."""
    if spool_size():
        try:
            spool_flush(engine.client, engine.keys.events, engine.stream_maxlen)
        except redis.RedisError:
            log.warning("degraded events still waiting for the store", exc_info=True)
