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
import threading
from collections import deque
from typing import Any

import redis

log = logging.getLogger(__name__)
DEGRADED_PREFIX = "rsv_d_"
SIGNATURE_CHARS = 16
SPOOL_LIMIT = 100_000

_spool: deque[dict[str, Any]] = deque(maxlen=SPOOL_LIMIT)
_lock = threading.Lock()


def degraded_id(*, tenant_id: int, nonce: str, secret: str) -> str:
    """A degraded reservation has no lease, so its id carries proof of its tenant."""
    return f"{DEGRADED_PREFIX}{nonce}{_signature(tenant_id, nonce, secret)}"


def is_degraded_id(reservation_id: str) -> bool:
    return reservation_id.startswith(DEGRADED_PREFIX)


def degraded_id_belongs(reservation_id: str, *, tenant_id: int, secret: str) -> bool:
    body = reservation_id.removeprefix(DEGRADED_PREFIX)
    nonce, signature = body[:-SIGNATURE_CHARS], body[-SIGNATURE_CHARS:]
    if not nonce or len(signature) != SIGNATURE_CHARS:
        return False
    return hmac.compare_digest(signature, _signature(tenant_id, nonce, secret))


def _signature(tenant_id: int, nonce: str, secret: str) -> str:
    message = f"{tenant_id}:{nonce}".encode()
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
