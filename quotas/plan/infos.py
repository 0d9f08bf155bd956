"""The configuration as plain, frozen data: what the hot path needs, read once."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from providers.backpressure import Backpressure
from tenants.models import Priority

NANO = Decimal(1_000_000_000)
PRIORITY_RANK = {value: rank for rank, value in enumerate(Priority.values)}


@dataclass(frozen=True, slots=True)
class TenantInfo:
    id: int
    slug: str
    timezone: str
    status: str


@dataclass(frozen=True, slots=True)
class FeatureInfo:
    id: int
    slug: str
    tenant_id: int
    priority: str
    status: str
    pool_ids: tuple[int, ...]  # empty: any pool serving the model


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: int
    name: str
    input_nusd: Decimal  # nano-USD per token
    cached_input_nusd: Decimal
    output_nusd: Decimal
    chars_per_token: float
    context_window: int | None

    def cost_nusd(self, input_tokens: int, cached_input_tokens: int, output_tokens: int) -> int:
        fresh = max(0, input_tokens - cached_input_tokens)
        exact = (
            fresh * self.input_nusd
            + cached_input_tokens * self.cached_input_nusd
            + output_tokens * self.output_nusd
        )
        return int(exact.to_integral_value(rounding="ROUND_CEILING"))


@dataclass(frozen=True, slots=True)
class PoolInfo:
    id: int
    slug: str
    fail_mode: str
    protect: dict[str, float]
    models: dict[str, ModelInfo]  # served models by name
    line_minutes: float = 1.0  # a minute limit's line holds this many minutes of capacity
    backpressure: Backpressure = field(default_factory=Backpressure)

    def protected_share_above(self, priority: str) -> float:
        """Share of per-minute capacity kept for classes more important than `priority`."""
        rank = PRIORITY_RANK[priority]
        return sum(s for cls, s in self.protect.items() if PRIORITY_RANK[cls] < rank)


@dataclass(frozen=True, slots=True)
class LimitInfo:
    id: int
    name: str
    metric: str
    window: str
    amount: Decimal | None
    guaranteed: Decimal | None
    enforcement: str
    tenant_id: int | None
    feature_id: int | None
    pool_id: int | None
    model_id: int | None
    timezone: str
    scope: dict[str, str]
    burst: Decimal | None = None  # a minute limit's bucket depth (None: the amount)

    @property
    def is_shared_pool_limit(self) -> bool:
        """A pool's own limit (of all its models, or of one): protected headroom applies."""
        return self.pool_id is not None and not (self.tenant_id or self.feature_id)

    @property
    def is_pool_capacity(self) -> bool:
        return self.pool_id is not None and not (self.tenant_id or self.feature_id or self.model_id)

    @property
    def guaranteed_units(self) -> int:
        return 0 if self.guaranteed is None else self.units(self.guaranteed)

    def units(self, value: Decimal) -> int:
        """Amounts in engine units: tokens, requests, or nano-USD."""
        return int(value * NANO) if self.metric == "cost_usd" else int(value)

    def applies(self, feature: FeatureInfo, pool_id: int, model_id: int) -> bool:
        return (
            self.tenant_id in (None, feature.tenant_id)
            and self.feature_id in (None, feature.id)
            and self.pool_id in (None, pool_id)
            and self.model_id in (None, model_id)
        )


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: int
    prefix: str
    hashed_secret: str
    tenant_id: int
    feature_ids: tuple[int, ...]
    revoked: bool
