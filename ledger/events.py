"""Usage stream entries as ledger rows, and how two accounts of one reservation merge.

A reservation's events can reach the ledger in any order (a reclaimed entry arrives after
later ones) and more than once (a batch committed but not acknowledged is read again), so a
row is merged, never overwritten: the outcome of the furthest state wins (held < expired <
committed, released), what describes the reservation (tenant, feature, what it reserved)
is kept from whichever event had it, and its expiry is the one granted last (by the
reservation or its latest extension, whichever event is the later in Redis time). Merging is
idempotent and order-independent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from quotas.plan import Plan, plans

Row = dict[str, Any]

STATE_OF_TYPE = {
    "reserved": "held",
    "extended": "held",
    "committed": "committed",
    "released": "released",
    "expired": "expired",
}
RANK = {"held": 0, "expired": 1, "committed": 2, "released": 2}

# Describe the reservation: the first non-empty value is kept.
IDENTITY_TEXT = ("tenant", "feature", "pool", "model", "priority", "api_key", "would_refuse")
IDENTITY_NUMBER = (
    "tenant_pk",
    "feature_pk",
    "pool_pk",
    "model_pk",
    "reserved_input_tokens",
    "reserved_output_tokens",
    "reserved_cost_nusd",
    "wait_ms",
    "promised_wait_ms",
    "metadata",
    "created_ms",
)
# The expiry granted last: the one of the event with the latest `expiry_granted_ms` (its
# at_ms; the later expiry when two events of one instant disagree).
LATEST = ("expires_ms", "expiry_granted_ms")
IDENTITY_FLAG = ("degraded", "estimated")
# The outcome: taken from the event of the furthest state.
OUTCOME = (
    "state",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "cost_nusd",
    "finish_reason",
    "upstream_status",
    "latency_ms",
    "actual_wait_ms",
    "lease_expired",
    "finished_ms",
)
USAGE_COLUMNS = (
    "rid",
    *IDENTITY_TEXT,
    *IDENTITY_NUMBER,
    *LATEST,
    *IDENTITY_FLAG,
    *OUTCOME,
    "ingested_ms",
)
REFUSAL_COLUMNS = (
    "rid",
    "at_ms",
    "tenant",
    "feature",
    "model",
    "priority",
    "reason",
    "limit_id",
    "ingested_ms",
)


def _int(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        try:
            return int(float(value))
        except ValueError:
            return None


@dataclass
class Resolver:
    """Slugs to ids (and prices) through the compiled configuration, memoised per batch."""

    plan: Plan

    def __post_init__(self) -> None:
        self.tenants = {t.slug: t.id for t in self.plan.tenants.values()}
        self.pools = {p.slug: p for p in self.plan.pools}
        self.memo: dict[tuple[str, str, str, str], tuple[Any, ...]] = {}

    def ids(self, tenant: str, feature: str, pool: str, model: str) -> tuple[Any, ...]:
        key = (tenant, feature, pool, model)
        known = self.memo.get(key)
        if known is None:
            known = self.memo[key] = self._ids(*key)
        return known

    def _ids(self, tenant: str, feature: str, pool: str, model: str) -> tuple[Any, ...]:
        if (tenant not in self.tenants or pool not in self.pools) and plans.get() is not self.plan:
            self.plan = plans.get()  # configured after this resolver was made
            self.__post_init__()
        tenant_pk = self.tenants.get(tenant)
        info = self.plan.features.get((tenant_pk, feature)) if tenant_pk else None
        pool_info = self.pools.get(pool)
        model_info = pool_info.models.get(model) if pool_info else None
        return (
            tenant_pk,
            info.id if info else None,
            pool_info.id if pool_info else None,
            model_info.id if model_info else None,
        )

    def price(self, pool: str, model: str, usage: tuple[int, int, int]) -> int | None:
        """Cost of usage the engine did not price (degraded reservations)."""
        pool_info = self.pools.get(pool)
        model_info = pool_info.models.get(model) if pool_info else None
        return model_info.cost_nusd(*usage) if model_info else None


def usage_row(fields: dict[str, str], resolver: Resolver, now_ms: int) -> Row | None:
    state = STATE_OF_TYPE.get(fields.get("type", ""))
    rid = fields.get("rid", "")
    if state is None or not rid:
        return None
    get = fields.get
    slugs = (get("tenant", ""), get("feature", ""), get("pool", ""), get("model", ""))
    metadata = _metadata(get("metadata"))
    row: Row = {
        "rid": rid[:64],
        "tenant": slugs[0],
        "feature": slugs[1],
        "pool": slugs[2],
        "model": slugs[3],
        "priority": get("priority", ""),
        "api_key": get("key", "")[:16],
        "would_refuse": get("would_refuse", "")[:200],
        "reserved_input_tokens": _int(get("reserved_input_tokens")),
        "reserved_output_tokens": _int(get("reserved_output_tokens")),
        "reserved_cost_nusd": _int(get("reserved_cost_nusd")),
        "wait_ms": _int(str(metadata.get("wait_ms", ""))) if metadata else None,
        "promised_wait_ms": _int(get("wait_ms")),
        "metadata": json.dumps(metadata) if metadata else None,
        "created_ms": _int(get("created_ms")),
        "expires_ms": _int(get("expires_ms")),
        "expiry_granted_ms": _int(get("at_ms")) if get("expires_ms") else None,
        "degraded": get("degraded") == "1",
        "estimated": get("estimated") == "1",
        "ingested_ms": now_ms,
        **_outcome(state, fields),
    }
    row["tenant_pk"], row["feature_pk"], row["pool_pk"], row["model_pk"] = resolver.ids(*slugs)
    if row["degraded"] and state == "committed" and row["cost_nusd"] is None:
        usage = (
            row["input_tokens"] or 0,
            row["cached_input_tokens"] or 0,
            row["output_tokens"] or 0,
        )
        row["cost_nusd"] = resolver.price(slugs[2], slugs[3], usage)
    if row["created_ms"] is None:  # a degraded reservation's own events carry no creation time
        row["created_ms"] = _int(get("at_ms"))
    return row


HELD_OUTCOME: Row = {
    "state": "held",
    "input_tokens": None,
    "cached_input_tokens": None,
    "output_tokens": None,
    "cost_nusd": None,
    "finish_reason": "",
    "upstream_status": None,
    "latency_ms": None,
    "actual_wait_ms": None,
    "lease_expired": False,
    "finished_ms": None,
}


def _outcome(state: str, fields: dict[str, str]) -> Row:
    if state == "held":  # half of all events: nothing to read
        return HELD_OUTCOME
    settled = state in ("committed", "released")
    return {
        "state": state,
        "input_tokens": _int(fields.get("input_tokens")) if settled else None,
        "cached_input_tokens": _int(fields.get("cached_input_tokens")) if settled else None,
        "output_tokens": _int(fields.get("output_tokens")) if settled else None,
        "cost_nusd": _int(fields.get("cost_nusd")) if settled else None,
        "finish_reason": fields.get("finish_reason", "")[:32],
        "upstream_status": _int(fields.get("upstream_status")),
        "latency_ms": _int(fields.get("latency_ms")),
        "actual_wait_ms": _actual_wait(fields) if state == "committed" else None,
        "lease_expired": fields.get("lease_expired") == "1",
        "finished_ms": None if state == "held" else _int(fields.get("at_ms")),
    }


def _actual_wait(fields: dict[str, str]) -> int | None:
    """How long the call waited before it went to the provider: the commit's time less the
    call's latency, from the reservation's creation (unknown without a latency)."""
    at, latency = _int(fields.get("at_ms")), _int(fields.get("latency_ms"))
    created = _int(fields.get("created_ms"))
    if at is None or latency is None or created is None:
        return None
    return max(0, at - latency - created)


def _metadata(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return {"raw": raw}
    return value if isinstance(value, dict) else {"value": value}


def refusal_row(fields: dict[str, str], now_ms: int) -> Row | None:
    rid = fields.get("rid", "")
    if fields.get("type") != "refused" or not rid:
        return None
    return {
        "rid": rid[:64],
        "at_ms": _int(fields.get("at_ms")) or now_ms,
        "tenant": fields.get("tenant", ""),
        "feature": fields.get("feature", ""),
        "model": fields.get("model", ""),
        "priority": fields.get("priority", ""),
        "reason": fields.get("reason", "")[:20],
        "limit_id": _int(fields.get("limit")),
        "ingested_ms": now_ms,
    }


POOL_EVENT_TYPES = ("adapted", "breaker_opened", "breaker_closed", "provider_limit")
POOL_EVENT_COMMON = ("type", "pool", "at_ms")


def pool_event_row(entry_id: str, fields: dict[str, str], resolver: Resolver) -> Row | None:
    """A pool's event (pressure.lua) as a ledger row, or None for any other event."""
    kind = fields.get("type", "")
    if kind not in POOL_EVENT_TYPES:
        return None
    pool = fields.get("pool", "")[:64]
    share = fields.get("share")
    try:
        shown = None if share is None else float(share)
    except ValueError:
        shown = None
    info = resolver.pools.get(pool)
    return {
        "entry_id": entry_id,
        "kind": kind,
        "pool": pool,
        "pool_pk": info.id if info else None,
        "at_ms": _int(fields.get("at_ms")) or 0,
        "share": shown,
        "detail": {k: v for k, v in fields.items() if k not in POOL_EVENT_COMMON},
    }


def rows_merge(old: Row, new: Row) -> Row:
    """Two accounts of one reservation as one; the same rules as the SQL upsert."""
    merged = dict(old)
    for name in IDENTITY_TEXT:
        if not merged[name]:
            merged[name] = new[name]
    for name in IDENTITY_NUMBER:
        if merged[name] is None:
            merged[name] = new[name]
    if _granted_later(new, merged):
        for name in LATEST:
            merged[name] = new[name]
    for name in IDENTITY_FLAG:
        merged[name] = bool(merged[name] or new[name])
    if RANK[new["state"]] > RANK[old["state"]]:
        for name in OUTCOME:
            merged[name] = new[name]
    merged["ingested_ms"] = new["ingested_ms"]
    return merged


def _granted_later(new: Row, old: Row) -> bool:
    """Whether `new` carries an expiry granted after `old`'s (or `old` carries none)."""
    if new["expires_ms"] is None:
        return False
    if old["expires_ms"] is None:
        return True
    new_at, old_at = new["expiry_granted_ms"] or 0, old["expiry_granted_ms"] or 0
    return (new_at, new["expires_ms"]) > (old_at, old["expires_ms"])


@dataclass
class Batch:
    usage: dict[str, Row]
    refusals: dict[str, Row]
    ids: list[str]
    pool_events: list[Row] = field(default_factory=list)
    keys_used: dict[str, int] = field(default_factory=dict)  # API key prefix: last at_ms


def batch_from_entries(
    entries: Iterable[tuple[str, dict[str, str]]], resolver: Resolver, now_ms: int
) -> Batch:
    """One row per reservation: several events of one rid in a batch merge in Python, because
    one INSERT ... ON CONFLICT may not touch the same row twice."""
    batch = Batch(usage={}, refusals={}, ids=[])
    for entry_id, fields in entries:
        batch.ids.append(entry_id)
        key, at_ms = fields.get("key", "")[:16], _int(fields.get("at_ms"))
        if key and at_ms is not None and at_ms > batch.keys_used.get(key, 0):
            batch.keys_used[key] = at_ms
        row = usage_row(fields, resolver, now_ms)
        if row is not None:
            seen = batch.usage.get(row["rid"])
            batch.usage[row["rid"]] = row if seen is None else rows_merge(seen, row)
            continue
        refusal = refusal_row(fields, now_ms)
        if refusal is not None:
            batch.refusals[refusal["rid"]] = refusal
            continue
        pool_event = pool_event_row(entry_id, fields, resolver)
        if pool_event is not None:
            batch.pool_events.append(pool_event)
    return batch


def safe_text(value: str) -> str:
    """Text every database stores: a lone surrogate as its backslash escape, NUL as `\\x00`."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def dead_letter_row(entry: tuple[str, dict[str, str]], error: BaseException) -> Row:
    """An entry that cannot be stored, as it came, and why."""
    entry_id, fields = entry
    return {
        "entry_id": entry_id,
        "rid": safe_text(str(fields.get("rid", "")))[:64],
        "event_type": safe_text(str(fields.get("type", "")))[:16],
        "tenant": safe_text(str(fields.get("tenant", "")))[:64],
        "fields": json.dumps(fields, ensure_ascii=True, sort_keys=True),
        "error": safe_text(f"{type(error).__name__}: {error}")[:2000],
    }
