"""The SDK's asyncio client against the real API server: the same contract as the sync one,
with the lease kept alive by a task."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import quotaclient
import redis
from quotaclient import AsyncQuotaClient

from tests.fakes.stack import Stack, live_stack
from tests.fixtures import World

pytestmark = pytest.mark.django_db(transaction=True)

T = TypeVar("T")


@pytest.fixture
def stack(
    live_server: Any, world: World, redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stack]:
    yield from live_stack(live_server, world, redis_db, monkeypatch)


def run(stack: Stack, scenario: Callable[[AsyncQuotaClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with stack.async_client() as client:
            return await scenario(client)

    return asyncio.run(main())


def reserve(client: AsyncQuotaClient, **options: Any) -> Any:
    options.setdefault("input_tokens", 100)
    options.setdefault("max_output_tokens", 400)
    return client.reserve("chat", "gpt-4o-mini", **options)


def test_an_async_block_that_succeeds_commits_its_usage(stack: Stack) -> None:
    async def scenario(client: AsyncQuotaClient) -> quotaclient.AsyncReservation:
        async with reserve(client) as reservation:
            reservation.record_usage(80, 12, finish_reason="stop", upstream_status=200)
        return reservation

    reservation = run(stack, scenario)

    assert reservation.settlement is not None
    assert reservation.settlement.status == "committed"
    committed = stack.event("committed")
    assert (committed["input_tokens"], committed["output_tokens"]) == ("80", "12")
    assert committed["finish_reason"] == "stop"


def test_an_async_block_that_raises_releases(stack: Stack) -> None:
    async def scenario(client: AsyncQuotaClient) -> str:
        with pytest.raises(ConnectionError):
            async with reserve(client) as reservation:
                raise ConnectionError("the provider went away")
        return str((await client.get(reservation.id))["status"])

    assert run(stack, scenario) == "released"


def test_an_awaited_reservation_is_settled_by_hand(stack: Stack) -> None:
    async def scenario(client: AsyncQuotaClient) -> quotaclient.Settlement:
        reservation = await reserve(client)
        return await reservation.commit(100, 5, finish_reason="length")

    settled = run(stack, scenario)

    assert (settled.status, settled.output_tokens) == ("committed", 5)


def test_a_long_async_call_keeps_its_lease_alive(stack: Stack) -> None:
    async def scenario(client: AsyncQuotaClient) -> tuple[str, quotaclient.Settlement | None]:
        async with reserve(client, ttl_seconds=1) as reservation:
            await asyncio.sleep(1.6)
            status = str((await client.get(reservation.id))["status"])
            await asyncio.sleep(1.0)
            reservation.record_usage(100, 20)
        return status, reservation.settlement

    status, settled = run(stack, scenario)

    assert status == "held"  # reading an expired lease would have expired it
    assert settled is not None and not settled.lease_expired


def test_an_async_refusal_is_typed(stack: Stack) -> None:
    stack.world.limit(feature=stack.world.chat, metric="requests", window="minute", amount=1)

    async def scenario(client: AsyncQuotaClient) -> quotaclient.QuotaError:
        await reserve(client)
        with pytest.raises(quotaclient.RateLimited) as refused:
            await reserve(client)
        return refused.value

    error = run(stack, scenario)

    assert error.limit is not None and error.limit.metric == "requests"
    assert error.retry_after is not None and 0 < error.retry_after <= 60
