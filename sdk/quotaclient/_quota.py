"""What a wrapped provider client reserves with: the feature, the quota server, and how."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._async import AsyncQuotaClient, AsyncReservation
from ._calls import Plan
from ._sync import QuotaClient, Reservation


@dataclass
class Quota:
    """How the calls of a wrapped client are reserved.

    `feature` is the feature the calls belong to. The quota server is `client` (or
    `async_client` for an async provider client), else one made from `base_url` and `api_key`
    (default: QUOTA_URL and QUOTA_API_KEY). `min_output_tokens` accepts a partial grant down
    to that many output tokens, and the call's cap is lowered to what was granted.
    `max_output_tokens` is the worst case of a call that names no cap of its own (it is then
    sent as the call's cap). `max_wait` is how long a call may wait for admission."""

    feature: str
    base_url: str | None = None
    api_key: str | None = None
    client: QuotaClient | None = None
    async_client: AsyncQuotaClient | None = None
    min_output_tokens: int | None = None
    max_output_tokens: int | None = None
    priority: str | None = None
    pool: str | None = None
    ttl_seconds: int = 60
    max_wait: float | None = None
    metadata: Mapping[str, Any] | None = None
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def sync_client(self) -> QuotaClient:
        with self._lock:
            if self.client is None:
                self.client = QuotaClient(self.base_url, self.api_key)
            return self.client

    def asyncio_client(self) -> AsyncQuotaClient:
        with self._lock:
            if self.async_client is None:
                self.async_client = AsyncQuotaClient(self.base_url, self.api_key)
            return self.async_client

    def reserve_args(self, call: Plan) -> dict[str, Any]:
        low = self.min_output_tokens
        if low is not None:
            low = min(low * call.choices, call.max_output_tokens)
        return {
            "messages": call.messages,
            "max_output_tokens": call.max_output_tokens,
            "min_output_tokens": low,
            "priority": self.priority,
            "pool": self.pool,
            "ttl_seconds": self.ttl_seconds,
            "metadata": self.metadata,
            "max_wait": self.max_wait,
        }


def reserve(quota: Quota, call: Plan) -> Reservation:
    return quota.sync_client().reserve(quota.feature, call.model, **quota.reserve_args(call))


async def reserve_async(quota: Quota, call: Plan) -> AsyncReservation:
    client = quota.asyncio_client()
    return await client.reserve(quota.feature, call.model, **quota.reserve_args(call))
