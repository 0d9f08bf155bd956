"""Plain data in and out of the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# The longest TTL, in seconds, a reservation or an extension may ask for: the API refuses
# more, and the ledger expires a degraded reservation that recorded none after it.
MAX_TTL = 3600
# The longest a reserve may offer to wait in line (`max_wait_ms`, line.lua).
MAX_WAIT_MS = 300_000


@dataclass(frozen=True, slots=True)
class Period:
    key: str
    start_ms: int
    stop_ms: int


@dataclass(frozen=True, slots=True)
class Check:
    """One limit as the engine sees it: where its state lives and how much it holds."""

    limit_id: int
    kind: str  # b: minute bucket, p: calendar budget, c: concurrency, g: guarantee
    metric: str
    cap: int
    enforcement: str = "hard"  # hard, soft or shadow
    key: str = ""
    periods: tuple[Period, ...] = ()
    floor: int = 0
    guards: tuple[tuple[str, int], ...] = ()  # (key, cap) of other features' guarantees
    line: int = 0  # most a minute bucket's line may hold (units); 0: never scheduled
    pool_limit: bool = False  # a pool's own minute limit: scaled by its adaptive share
    rate: int = 0  # a bucket deeper or shallower than its refill: refill per minute (0: cap)
    split: bool = False  # shared with other partitions: this one holds an allotment of it

    def redis_keys(self) -> list[str]:
        return [self.key] if self.key else [p.key for p in self.periods]

    def as_lua(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.limit_id,
            "kind": self.kind,
            "m": self.metric,
            "cap": self.cap,
            "enf": self.enforcement,
        }
        if self.key:
            data["k"] = self.key
        if self.periods:
            data["periods"] = [
                {"k": p.key, "start": p.start_ms, "stop": p.stop_ms} for p in self.periods
            ]
        if self.floor:
            data["floor"] = self.floor
        if self.guards:
            data["guards"] = [{"k": k, "cap": cap} for k, cap in self.guards]
        if self.line:
            data["lq"] = self.line
        if self.pool_limit:
            data["pl"] = 1
        if self.rate:
            data["rate"] = self.rate
        if self.split:
            data["sp"] = 1
        return data


@dataclass(frozen=True, slots=True)
class Pressure:
    """A pool's adaptation and breaker settings as the scripts take them (see pressure.lua),
    and the key of its state."""

    key: str
    adaptive: bool
    floor: float
    decrease: float
    cooldown_ms: int
    recovery_ms: int
    window_ms: int  # 0: no breaker
    min_calls: int
    failure_ratio: float
    open_ms: int

    def as_lua(self) -> dict[str, Any]:
        return {
            "k": self.key,
            "ad": int(self.adaptive),
            "fl": self.floor,
            "dc": self.decrease,
            "cd": self.cooldown_ms,
            "rc": self.recovery_ms,
            "bw": self.window_ms,
            "bn": self.min_calls,
            "br": self.failure_ratio,
            "bo": self.open_ms,
        }


@dataclass(frozen=True, slots=True)
class PoolOption:
    pool: str
    checks: tuple[Check, ...]
    pressure: Pressure | None = None


@dataclass(frozen=True, slots=True)
class Report:
    """What a caller reports of the provider's answer at commit or release: its status (0: a
    timeout or connection failure) and the rate limits its headers stated, by metric
    (`quotas.upstream_headers`)."""

    status: int | None = None
    limits: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_lua(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.status is not None:
            data["st"] = self.status
        if self.limits:
            data["hd"] = self.limits
        return data


@dataclass(frozen=True, slots=True)
class Owner:
    """Who asks: a reservation is visible only to its tenant (and a narrowed key's features)."""

    tenant_id: int
    feature_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class KeyHolder:
    """Who asks when the plan cannot be loaded: the holder of the API key that made the
    reservation, known by the digest its lease recorded (`quotas.keys.lease_digest`). The
    tenant and features are the lease's; no plan version is checked."""

    digest: str


@dataclass(frozen=True, slots=True)
class ReserveCall:
    reservation_id: str
    version: int
    tenant_id: int
    feature_id: int
    options: tuple[PoolOption, ...]
    input_tokens: int
    max_output_tokens: int
    min_output_tokens: int
    cost_fixed: int  # nano-USD of the input
    cost_per_output: float  # nano-USD per output token
    prices: tuple[float, float, float]  # nano-USD per input, cached input, output token
    ttl_ms: int
    meta: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str = ""
    idempotency_hash: str = ""
    key_digest: str = ""  # of the API key that asks, recorded in the lease
    max_wait_ms: int = 0  # may wait in line this long for per-minute capacity (line.lua)


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    body_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LimitState:
    limit_id: int
    cap: int
    remaining: float
    reset_ms: int | None
    configured: int | None = None  # a pool's own limit: its configured cap (cap: effective)


@dataclass(frozen=True, slots=True)
class Granted:
    reservation_id: str
    pool: str
    output_tokens: int
    cost_nusd: int
    expires_ms: int
    now_ms: int
    limits: tuple[LimitState, ...]
    would_refuse: tuple[int, ...]
    degraded: bool = False  # admitted unenforced: the store was down and the pool fails open
    start_ms: int | None = None  # scheduled: the call may go to the provider from then on
    breaker: tuple[dict[str, Any], ...] = ()  # pools whose breaker changed the decision


@dataclass(frozen=True, slots=True)
class Refused:
    reason: Literal["rate_limited", "budget_exhausted", "concurrency"]
    limit_id: int
    remaining: float
    cap: int
    needed: int
    retry_after_ms: int | None  # None: it can never fit
    now_ms: int


@dataclass(frozen=True, slots=True)
class Unavailable:
    """Every candidate pool's breaker is open: the provider is failing there."""

    pool: str
    retry_after_ms: int
    now_ms: int


@dataclass(frozen=True, slots=True)
class LeaseView:
    """A reservation as stored: its state, what it reserved, and its settlement if any."""

    data: dict[str, Any]
    now_ms: int

    @property
    def state(self) -> str:
        return str(self.data["st"])


@dataclass(frozen=True, slots=True)
class Existing:
    """An idempotency key replayed: the reservation as it is, and the first answer."""

    lease: LeaseView
    granted: Granted


@dataclass(frozen=True, slots=True)
class Settled:
    result: dict[str, Any]
    spread: str | None = None  # a provider 429 reported: the pool, for its other partitions


@dataclass(frozen=True, slots=True)
class Conflict:
    state: str
    wait_ms: int | None = None  # 'scheduled': how long until the reservation's start


@dataclass(frozen=True, slots=True)
class Missing:
    pass


@dataclass(frozen=True, slots=True)
class Stale:
    """The plan is older than the configuration: reload it and ask again."""


@dataclass(frozen=True, slots=True)
class Lost:
    """The store lost its data (its config version key is gone while the plan has one):
    nothing was decided; the store must be rebuilt from the ledger first."""


@dataclass(frozen=True, slots=True)
class Held:
    """Reservations held now: how many match, and the first few (as `held.lua` shows them)."""

    count: int
    complete: bool  # False: more leases were held than the scan looked at
    leases: tuple[dict[str, Any], ...]
    now_ms: int
    waiting: int = 0  # scheduled reservations not yet started (in line)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Counters and the usage events not yet acknowledged by a group, read at one instant."""

    values: tuple[int | None, ...]
    entries: tuple[tuple[str, dict[str, str]], ...]


@dataclass(frozen=True, slots=True)
class BudgetAdjustment:
    key: str
    by: int  # units to add (negative to take away)
    expire_at_ms: int


@dataclass(frozen=True, slots=True)
class LeaseRestore:
    reservation_id: str
    lease: dict[str, Any]  # the lease as reserve.lua writes it
    expires_ms: int
    slots: tuple[str, ...]  # concurrency counters it holds
