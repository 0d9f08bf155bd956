"""What the quota server answers, as typed values: limits, grants and settlements."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Limit:
    """One limit as the server describes it: in a grant, a refusal or a usage report."""

    id: int | None
    name: str
    metric: str
    window: str | None
    enforcement: str
    limit: float
    remaining: float
    scope: Mapping[str, str] = field(default_factory=dict)
    reset_seconds: int | None = None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Limit:
        return cls(
            id=body.get("id"),
            name=str(body.get("name", "")),
            metric=str(body.get("metric", "")),
            window=body.get("window"),
            enforcement=str(body.get("enforcement", "hard")),
            limit=body.get("limit", 0),
            remaining=body.get("remaining", 0),
            scope=dict(body.get("scope") or {}),
            reset_seconds=body.get("reset_seconds"),
        )


@dataclass(frozen=True)
class Grant:
    """A held reservation: what it reserved and until when."""

    id: str
    feature: str
    model: str
    pool: str | None
    priority: str | None
    input_tokens: int
    output_tokens: int
    partial: bool
    cost_usd: float
    expires_at: datetime | None
    input_tokens_estimated: bool
    degraded: bool
    limits: tuple[Limit, ...]
    would_refuse: tuple[str, ...]
    raw: Mapping[str, Any]
    # Scheduled: the server took the capacity now for a call that may start at `start_at`,
    # `wait_ms` after the answer (the client sleeps that long before returning it).
    start_at: datetime | None = None
    wait_ms: int = 0

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Grant:
        reserved = body.get("reserved") or {}
        granted = body.get("granted") or {}
        return cls(
            id=str(body["id"]),
            feature=str(body.get("feature", "")),
            model=str(body.get("model", "")),
            pool=body.get("pool"),
            priority=body.get("priority"),
            input_tokens=int(reserved.get("input_tokens") or 0),
            output_tokens=int(granted.get("output_tokens", reserved.get("output_tokens") or 0)),
            partial=bool(granted.get("partial", False)),
            cost_usd=float(reserved.get("cost_usd") or 0.0),
            expires_at=parse_time(body.get("expires_at")),
            input_tokens_estimated=bool(body.get("input_tokens_estimated", False)),
            degraded=bool(body.get("degraded", False)),
            limits=tuple(Limit.from_body(lim) for lim in body.get("limits") or ()),
            would_refuse=tuple(str(name) for name in body.get("would_refuse") or ()),
            raw=body,
            start_at=parse_time(body.get("start_at")),
            wait_ms=int(body.get("wait_ms") or 0),
        )


@dataclass(frozen=True)
class Usage:
    """What a call used, as the commit reports it. Cached input tokens are part of
    input_tokens."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    finish_reason: str = ""
    upstream_status: int | None = None
    latency_ms: int | None = None
    upstream_headers: Mapping[str, str] | None = None  # the provider's rate-limit headers

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_input_tokens": min(self.cached_input_tokens, self.input_tokens),
        }
        # Sent only when known: older servers refused a blank one (while defaulting to it).
        if self.finish_reason:
            body["finish_reason"] = self.finish_reason
        if self.upstream_status is not None:
            body["upstream_status"] = self.upstream_status
        if self.latency_ms is not None:
            body["latency_ms"] = max(0, self.latency_ms)
        if self.upstream_headers:
            body["upstream_headers"] = dict(self.upstream_headers)
        return body


@dataclass(frozen=True)
class Refusal:
    """Why a call did not happen, as a release reports it: the provider's status (429: it
    refused the call) and its rate-limit headers."""

    upstream_status: int | None = None
    latency_ms: int | None = None
    upstream_headers: Mapping[str, str] | None = None

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.upstream_status is not None:
            body["upstream_status"] = self.upstream_status
        if self.latency_ms is not None:
            body["latency_ms"] = max(0, self.latency_ms)
        if self.upstream_headers:
            body["upstream_headers"] = dict(self.upstream_headers)
        return body


@dataclass(frozen=True)
class Settlement:
    """The answer to a commit or a release."""

    id: str
    status: str
    lease_expired: bool
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_usd: float
    refunded_input_tokens: int
    refunded_output_tokens: int
    refunded_cost_usd: float
    overrun: bool
    degraded: bool
    raw: Mapping[str, Any]

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Settlement:
        usage = body.get("usage") or {}
        refunded = body.get("refunded") or {}
        return cls(
            id=str(body["id"]),
            status=str(body["status"]),
            lease_expired=bool(body.get("lease_expired", False)),
            input_tokens=int(usage.get("input_tokens") or 0),
            cached_input_tokens=int(usage.get("cached_input_tokens") or 0),
            output_tokens=int(usage.get("output_tokens") or 0),
            cost_usd=float(usage.get("cost_usd") or 0.0),
            refunded_input_tokens=int(refunded.get("input_tokens") or 0),
            refunded_output_tokens=int(refunded.get("output_tokens") or 0),
            refunded_cost_usd=float(refunded.get("cost_usd") or 0.0),
            overrun=bool(body.get("overrun", False)),
            degraded=bool(body.get("degraded", False)),
            raw=body,
        )
