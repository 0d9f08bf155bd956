"""How reservations, settlements and limits look in API responses."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

from quotas.engine import LeaseView, Settled
from quotas.engine.types import LimitState
from quotas.plan import NANO, Plan
from quotas.refusals import limit_body
from quotas.reservations import Reserved

WINDOW_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}
NANO_F = float(NANO)


ISO_FAST_BEFORE_MS = 4_102_444_800_000  # 2100-01-01: ms / 1000 rounds to the exact ms below
ISO_SECONDS_KEPT = 4096
_iso_seconds: dict[int, str] = {}


def iso(ms: int) -> str:
    """An instant in ms as ISO 8601 UTC: 2026-11-28T23:38:26.983000Z, no fraction on a whole
    second. A reserve writes five (its expiry, every limit's reset), mostly within the same
    few seconds, so each second's date and time is formatted once."""
    if type(ms) is int and 0 <= ms < ISO_FAST_BEFORE_MS:
        seconds, millis = divmod(ms, 1000)
        text = _iso_seconds.get(seconds)
        if text is None:
            if len(_iso_seconds) >= ISO_SECONDS_KEPT:
                _iso_seconds.clear()
            text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            _iso_seconds[seconds] = text
        return f"{text}.{millis:03d}000Z" if millis else text + "Z"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def usd(nano: float) -> float:
    return round(nano / float(NANO), 9)


def reserved_body(reserved: Reserved) -> dict[str, Any]:
    granted = reserved.granted
    body: dict[str, Any] = {
        "id": granted.reservation_id,
        "status": "held",
        "feature": reserved.feature.slug,
        "model": reserved.model,
        "pool": granted.pool,
        "priority": reserved.priority,
        "input_tokens_estimated": reserved.estimated,
        "reserved": {
            "input_tokens": reserved.input_tokens,
            "output_tokens": granted.output_tokens,
            "cost_usd": usd(granted.cost_nusd),
        },
        "granted": {
            "output_tokens": granted.output_tokens,
            "partial": granted.output_tokens < reserved.requested_output_tokens,
        },
        "expires_at": iso(granted.expires_ms),
        "limits": [_limit(reserved.plan, state, granted.now_ms) for state in granted.limits],
        "would_refuse": [_name(reserved.plan, i) for i in granted.would_refuse],
        "degraded": granted.degraded,
    }
    if granted.start_ms is not None:
        body.update(_scheduled(granted.start_ms, granted.now_ms))
    if granted.breaker:  # a pool's breaker changed the decision (skipped it, or a probe)
        body["breaker"] = [_breaker(note) for note in granted.breaker]
    return body


def _scheduled(start_ms: int, now_ms: int) -> dict[str, Any]:
    """A scheduled reservation: its call may go to the provider from `start_at` on."""
    return {"status": "scheduled", "start_at": iso(start_ms), "wait_ms": start_ms - now_ms}


def _breaker(note: dict[str, Any]) -> dict[str, Any]:
    shown = {"pool": note.get("pool"), "state": note.get("state")}
    if note.get("probe"):
        shown["probe"] = True
    if note.get("retry_ms") is not None:
        shown["retry_after_ms"] = max(0, int(note["retry_ms"]))
    return shown


def _limit(plan: Plan, state: LimitState, now_ms: int) -> dict[str, Any]:
    limit = plan.limits.get(state.limit_id)
    if limit is None:
        body = limit_body(plan, state.limit_id, state.cap, state.remaining, None)
    else:  # limit_body's answer, built inline: this runs for every limit of every reserve
        cost = limit.metric == "cost_usd"
        remaining = max(0.0, state.remaining)
        body = {
            "id": state.limit_id,
            "name": limit.name,
            "scope": limit.scope,
            "metric": limit.metric,
            "window": limit.window or None,
            "enforcement": limit.enforcement,
            "limit": round(state.cap / NANO_F, 9) if cost else math.floor(state.cap),
            "remaining": round(remaining / NANO_F, 9) if cost else math.floor(remaining),
        }
    if state.configured is not None:  # a pool's own limit: effective, configured, adapted
        cost = body["metric"] == "cost_usd"
        body["configured"] = (
            round(state.configured / NANO_F, 9) if cost else math.floor(state.configured)
        )
        body["adapted"] = state.cap < state.configured
    if state.reset_ms is not None:
        body["reset"] = iso(state.reset_ms)
        body["reset_seconds"] = max(0, math.ceil((state.reset_ms - now_ms) / 1000))
    return body


def _name(plan: Plan, limit_id: int) -> str:
    limit = plan.limits.get(limit_id)
    return limit.name if limit else f"limit {limit_id}"


def lease_body(lease: LeaseView) -> dict[str, Any]:
    data = lease.data
    meta = data.get("meta") or {}
    reserved = data.get("r") or {}
    body: dict[str, Any] = {
        "id": data["id"],
        "status": data["st"],
        "feature": meta.get("feature"),
        "model": meta.get("model"),
        "pool": data.get("pool"),
        "priority": meta.get("priority"),
        "input_tokens_estimated": bool(int(meta.get("estimated", 0))),
        "reserved": {
            "input_tokens": reserved.get("in_"),
            "output_tokens": reserved.get("out"),
            "cost_usd": usd(reserved.get("cost", 0)),
        },
        "created_at": iso(data["created"]),
        "expires_at": iso(data["e"]),
        "metadata": json.loads(meta.get("metadata", "{}")),
    }
    if data.get("sa") is not None:
        body["start_at"] = iso(data["sa"])
        if data["st"] == "held" and lease.now_ms < data["sa"]:
            body.update(_scheduled(data["sa"], lease.now_ms))
    if data.get("res"):
        body.update(settled_body(Settled(result=data["res"])))
        body["status"] = data["st"]
    return body


def settled_body(settled: Settled) -> dict[str, Any]:
    res = settled.result
    refunded = res.get("refunded") or {}
    return {
        "id": res["id"],
        "status": res["status"],
        "lease_expired": bool(res.get("lease_expired")),
        "usage": {
            "input_tokens": res["input_tokens"],
            "cached_input_tokens": res["cached_input_tokens"],
            "output_tokens": res["output_tokens"],
            "cost_usd": usd(res["cost_nusd"]),
        },
        "refunded": {
            "input_tokens": refunded.get("input_tokens", 0),
            "output_tokens": refunded.get("output_tokens", 0),
            "cost_usd": usd(refunded.get("cost_nusd", 0)),
        },
        "overrun": refunded.get("output_tokens", 0) < 0 or refunded.get("input_tokens", 0) < 0,
        "degraded": bool(res.get("degraded")),
    }


def ratelimit_headers(limits: list[dict[str, Any]]) -> dict[str, str]:
    """IETF RateLimit-Policy / RateLimit for the tightest token or request limit."""
    candidates = [
        lim
        for lim in limits
        if lim["metric"] != "cost_usd"
        and lim["enforcement"] == "hard"
        and lim["limit"]
        and lim["window"] is not None
    ]
    if not candidates:
        return {}
    tight = min(candidates, key=lambda lim: lim["remaining"] / lim["limit"])
    name = f"{tight['metric']}-{tight['window']}"
    window = WINDOW_SECONDS.get(tight["window"], 0)
    policy = f'"{name}";q={tight["limit"]}' + (f";w={window}" if window else "")
    return {
        "RateLimit-Policy": policy,
        "RateLimit": f'"{name}";r={tight["remaining"]};t={tight.get("reset_seconds", 0)}',
    }
