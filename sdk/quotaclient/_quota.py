"""What a wrapped provider client reserves with: the feature, the quota server, and how."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ._async import AsyncQuotaClient, AsyncReservation
from ._calls import Plan
from ._errors import NotFound, Refused, Unreachable
from ._fit import Fit, unchanged
from ._offline import AsyncOffline, Backlog, Offline
from ._sync import QuotaClient, Reservation

log = logging.getLogger("quotaclient")


@dataclass
class Quota:
    """How the calls of a wrapped client are reserved.

    `feature` is the feature the calls belong to. The quota server is `client` (or
    `async_client` for an async provider client), else one made from `base_url` and `api_key`
    (default: QUOTA_URL and QUOTA_API_KEY). `min_output_tokens` accepts a partial grant down
    to that many output tokens, and the call's cap is lowered to what was granted.
    `max_output_tokens` is the worst case of a call that names no cap of its own (it is then
    sent as the call's cap); without it, such a call reserves `default_output_tokens`, is sent
    as it was (uncapped) and commits what it used. `max_wait` is how long a call may wait for
    admission. `fallback_model` is reserved in place of a model the server does not know (its
    prices stand in; the real model goes in the metadata). `on_unreachable="allow"` lets a
    call through when the quota server cannot be reached, and reports its usage later from a
    backlog of `backlog_size` calls (see _offline.py); the default, "raise", raises
    `Unreachable`."""

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
    default_output_tokens: int = 1024
    fallback_model: str | None = None
    on_unreachable: Literal["raise", "allow"] = "raise"
    backlog_size: int = 1000
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )
    backlog: Backlog = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.on_unreachable not in ("raise", "allow"):
            raise ValueError('on_unreachable is "raise" or "allow".')
        self.backlog = Backlog(self.backlog_size)

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

    def fallback_args(self, call: Plan) -> dict[str, Any]:
        """The reservation of a call whose model the server does not know."""
        args = self.reserve_args(call)
        args["metadata"] = {**(self.metadata or {}), "model": call.model}
        return args

    def offline_options(self) -> dict[str, Any]:
        return {"priority": self.priority, "pool": self.pool, "metadata": self.metadata}

    def let_through(self, error: Unreachable) -> bool:
        if self.on_unreachable != "allow":
            return False
        log.warning("quota server unreachable, calling without a reservation: %s", error)
        return True


def unknown_model(error: NotFound) -> bool:
    """Whether a 404 to a reservation is about its model (not its feature or pool)."""
    return str(error.body.get("message", "")).startswith("No such model")


def reserve(quota: Quota, call: Plan) -> Reservation:
    client = quota.sync_client()
    try:
        return client.reserve(quota.feature, call.model, **quota.reserve_args(call))
    except NotFound as error:
        if quota.fallback_model is None or not unknown_model(error):
            raise
    return client.reserve(quota.feature, quota.fallback_model, **quota.fallback_args(call))


async def reserve_async(quota: Quota, call: Plan) -> AsyncReservation:
    client = quota.asyncio_client()
    try:
        return await client.reserve(quota.feature, call.model, **quota.reserve_args(call))
    except NotFound as error:
        if quota.fallback_model is None or not unknown_model(error):
            raise
    return await client.reserve(quota.feature, quota.fallback_model, **quota.fallback_args(call))


def admit(quota: Quota, call: Plan, fit: Fit = unchanged) -> Reservation | Offline:
    """The reservation a wrapped call goes ahead with: a refusal raised as `fit` makes it,
    an unreachable server let through if the quota allows it; the backlog of calls let
    through earlier is reported first."""
    try:
        reservation = reserve(quota, call)
    except Unreachable as error:
        if quota.let_through(error):
            return Offline(quota.feature, call, quota.backlog, quota.offline_options())
        raise
    except Refused as refusal:
        raise fit(refusal) from None
    quota.backlog.replay(quota.sync_client())
    return reservation


async def admit_async(
    quota: Quota, call: Plan, fit: Fit = unchanged
) -> AsyncReservation | AsyncOffline:
    try:
        reservation = await reserve_async(quota, call)
    except Unreachable as error:
        if quota.let_through(error):
            return AsyncOffline(quota.feature, call, quota.backlog, quota.offline_options())
        raise
    except Refused as refusal:
        raise fit(refusal) from None
    await quota.backlog.replay_async(quota.asyncio_client())
    return reservation
