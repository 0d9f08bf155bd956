"""The real quota server as the SDK sees it: the live test server, the world's API key, and
the usage events the server wrote to Redis (the only place where a commit's finish reason,
upstream status and latency can be read back)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import redis
from django.conf import settings
from django.core.servers.basehttp import WSGIRequestHandler
from quotaclient import AsyncQuotaClient, QuotaClient

from quotas.reservations import get_engine
from tests.fixtures import World

EVENTS = f"q:{{{settings.QUOTA_HASH_TAG}}}:events"
T = TypeVar("T")


@dataclass
class Sleeper:
    """A client's sleep that does not sleep: it moves the quota engine's clock instead, and
    notes how long it slept and how many upstream calls `seen` had counted by then."""

    seen: list[Any]
    sleeps: list[tuple[float, int]] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.sleeps.append((seconds, len(self.seen)))
        get_engine().clock_offset_ms += round(seconds * 1000)


@dataclass
class Stack:
    url: str
    world: World
    redis: redis.Redis
    clients: list[QuotaClient] = field(default_factory=list)
    async_clients: list[AsyncQuotaClient] = field(default_factory=list)

    def client(self, **options: Any) -> QuotaClient:
        """A client of the world's tenant, closed (its lease keeper stopped) after the test."""
        return self.kept(QuotaClient(self.url, self.world.secret, **options))

    def kept(self, client: QuotaClient) -> QuotaClient:
        """`client`, closed after the test: a connection left open keeps a test server thread,
        and the database connection it holds, alive past the test."""
        self.clients.append(client)
        return client

    def async_client(self, **options: Any) -> AsyncQuotaClient:
        """An async client of the world's tenant, closed by `run` in the loop it ran in."""
        client = AsyncQuotaClient(self.url, self.world.secret, **options)
        self.async_clients.append(client)
        return client

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        """asyncio.run(main), closing the async clients made for it before its loop ends."""

        async def closing() -> T:
            try:
                return await main
            finally:
                while self.async_clients:
                    await self.async_clients.pop().aclose()

        return asyncio.run(closing())

    def events(self, kind: str | None = None) -> list[dict[str, str]]:
        decoded = [
            {k.decode(): v.decode() for k, v in fields.items()}
            for _, fields in self.redis.xrange(EVENTS)
        ]
        return [e for e in decoded if kind is None or e["type"] == kind]

    def event(self, kind: str) -> dict[str, str]:
        """The one event of that kind: tests make one call at a time."""
        found = self.events(kind)
        assert len(found) == 1, found
        return found[0]


def live_stack(
    live_server: Any, world: World, redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stack]:
    """Body of each SDK test module's `stack` fixture. The test server writes headers and
    body separately; without Nagle's delay a keep-alive request takes 1 ms, not 40."""
    monkeypatch.setattr(WSGIRequestHandler, "disable_nagle_algorithm", True)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stack = Stack(str(live_server.url), world, redis_db)
    yield stack
    for client in stack.clients:
        client.close()
