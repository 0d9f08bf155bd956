"""Waiting for admission: a retry honours Retry-After with full jitter, and a retry budget
bounds how many retries a client makes at all. Against the real API server, with a fake
sleep that moves the engine's clock instead of waiting."""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import quotaclient
import redis
from quotaclient import QuotaError, RetryBudget, RetryPolicy
from quotaclient._retry import Waiter

from quotas.plan import plans
from quotas.reservations import get_engine
from tests.fakes.stack import Stack, live_stack
from tests.fixtures import World

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def stack(
    live_server: Any, world: World, redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stack]:
    yield from live_stack(live_server, world, redis_db, monkeypatch)


class TimeMachine:
    """Sleeps without sleeping: a fake clock moves forward, and (unless frozen) so does the
    time the quota engine reads, so buckets refill as if the wait had happened."""

    def __init__(self, *, move_engine: bool = True) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.move_engine = move_engine

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.move_engine:
            get_engine().clock_offset_ms += round(seconds * 1000)

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)


@dataclass(frozen=True)
class SpyPolicy(RetryPolicy):
    """A retry policy that remembers each refusal's Retry-After and the delay it chose."""

    seen: list[tuple[float | None, float]] = field(default_factory=list)

    def delay(self, error: QuotaError, attempt: int, rng: random.Random) -> float:
        chosen = super().delay(error, attempt, rng)
        self.seen.append((error.retry_after, chosen))
        return chosen


def tight_minute_limit(stack: Stack) -> None:
    """1000 tokens a minute for chat, 800 of them held: the next 800 must wait ~36 s."""
    stack.world.limit(feature=stack.world.chat, metric="tokens", window="minute", amount=1000)
    with stack.client() as client:
        client.reserve("chat", "gpt-4o-mini", input_tokens=100, max_output_tokens=700)


def refused(retry_after: float | None, cls: type[QuotaError] = quotaclient.RateLimited) -> Any:
    return cls("refused", status=429, retry_after=retry_after)


# -- against the server --------------------------------------------------------------------


def test_a_refused_reservation_waits_retry_after_plus_jitter_and_is_then_admitted(
    stack: Stack,
) -> None:
    tight_minute_limit(stack)
    time_machine = TimeMachine()
    policy = SpyPolicy(max_wait=120, base=0.5, schedule=False)
    client = stack.client(
        retry=policy, sleep=time_machine.sleep, clock=time_machine.clock, rng=random.Random(7)
    )

    reservation = client.reserve("chat", "gpt-4o-mini", input_tokens=100, max_output_tokens=700)

    assert reservation.output_tokens == 700
    assert len(policy.seen) == 1, policy.seen  # one refusal, one wait, admitted
    retry_after, waited = policy.seen[0]
    assert retry_after is not None and 30 <= retry_after <= 36
    assert retry_after <= waited <= retry_after + 0.5  # never early; jitter within its window
    assert time_machine.sleeps == [waited]
    assert [e["type"] for e in stack.events()][-2:] == ["refused", "reserved"]


def test_the_async_client_waits_the_same_way(stack: Stack) -> None:
    tight_minute_limit(stack)
    time_machine = TimeMachine()
    policy = SpyPolicy(max_wait=120, base=0.5, schedule=False)

    async def main() -> int:
        async with stack.async_client(
            retry=policy, sleep=time_machine.async_sleep, clock=time_machine.clock
        ) as client:
            reservation = await client.reserve(
                "chat", "gpt-4o-mini", input_tokens=100, max_output_tokens=700
            )
            await reservation.release()
            return reservation.output_tokens

    assert asyncio.run(main()) == 700
    retry_after, waited = policy.seen[0]
    assert len(policy.seen) == 1
    assert retry_after is not None and retry_after <= waited <= retry_after + 0.5


def test_a_caller_that_may_wait_is_scheduled_and_sleeps_once_until_its_start(
    stack: Stack,
) -> None:
    tight_minute_limit(stack)
    time_machine = TimeMachine()
    policy = SpyPolicy(max_wait=120)
    client = stack.client(retry=policy, sleep=time_machine.sleep, clock=time_machine.clock)

    reservation = client.reserve("chat", "gpt-4o-mini", input_tokens=100, max_output_tokens=700)

    assert policy.seen == []  # never refused
    assert 30_000 <= reservation.wait_ms <= 36_000
    assert time_machine.sleeps == [reservation.wait_ms / 1000]
    assert [e["type"] for e in stack.events()][-1] == "reserved"
    assert client.get(reservation.id)["status"] == "held"  # the engine's clock has moved on
    reservation.commit(100, 10)
    assert reservation.settlement is not None
    assert reservation.settlement.status == "committed"


def test_the_async_client_sleeps_until_the_start_too(stack: Stack) -> None:
    tight_minute_limit(stack)
    time_machine = TimeMachine()

    async def main() -> int:
        async with stack.async_client(
            retry=RetryPolicy(max_wait=120),
            sleep=time_machine.async_sleep,
            clock=time_machine.clock,
        ) as client:
            reservation = await client.reserve(
                "chat", "gpt-4o-mini", input_tokens=100, max_output_tokens=700
            )
            await reservation.release()
            return reservation.wait_ms

    wait_ms = asyncio.run(main())
    assert wait_ms > 0 and time_machine.sleeps == [wait_ms / 1000]


def test_a_wait_longer_than_max_wait_is_refused_not_scheduled(stack: Stack) -> None:
    tight_minute_limit(stack)
    frozen = TimeMachine(move_engine=False)
    client = stack.client(retry=RetryPolicy(max_wait=20), sleep=frozen.sleep, clock=frozen.clock)

    with pytest.raises(quotaclient.RateLimited):
        client.reserve("chat", "gpt-4o-mini", input_tokens=100, max_output_tokens=700)
    assert frozen.sleeps == []  # Retry-After (~36 s) is past the wait: no retry either
    assert stack.events("refused")[-1]["reason"] == "rate_limited"


def test_retries_stop_when_the_retry_budget_is_spent(stack: Stack) -> None:
    tight_minute_limit(stack)
    frozen = TimeMachine(move_engine=False)  # every retry is refused again
    client = stack.client(
        retry=RetryPolicy(max_wait=10_000, schedule=False),
        budget=RetryBudget(ratio=0.1, burst=2),
        sleep=frozen.sleep,
        clock=frozen.clock,
    )

    with pytest.raises(quotaclient.RateLimited):
        client.reserve("chat", "gpt-4o-mini", input_tokens=100, max_output_tokens=700)
    assert len(frozen.sleeps) == 2
    assert len(stack.events("refused")) == 3  # the first attempt and two retries

    # The budget is the client's, not the call's: the next call gets no retry at all.
    with pytest.raises(quotaclient.RateLimited):
        client.reserve("chat", "gpt-4o-mini", input_tokens=100, max_output_tokens=700)
    assert len(frozen.sleeps) == 2
    assert len(stack.events("refused")) == 4


def test_a_budget_that_resets_after_max_wait_is_not_waited_for(stack: Stack) -> None:
    stack.world.limit(feature=stack.world.chat, metric="tokens", window="day", amount=500)
    time_machine = TimeMachine()
    client = stack.client(sleep=time_machine.sleep, clock=time_machine.clock)
    client.reserve("chat", "gpt-4o-mini", input_tokens=100, max_output_tokens=400)

    with pytest.raises(quotaclient.BudgetExhausted):
        client.reserve("chat", "gpt-4o-mini", input_tokens=1, max_output_tokens=1, max_wait=60)

    assert time_machine.sleeps == []


def test_a_paused_feature_is_not_retried(stack: Stack) -> None:
    stack.world.chat.status = "paused"
    stack.world.chat.save()
    plans.clear()
    time_machine = TimeMachine()
    client = stack.client(sleep=time_machine.sleep, clock=time_machine.clock)

    with pytest.raises(quotaclient.FeaturePaused):
        client.reserve("chat", "gpt-4o-mini", input_tokens=1, max_output_tokens=1, max_wait=60)

    assert time_machine.sleeps == []


# -- the rules themselves ------------------------------------------------------------------


def test_clients_refused_together_come_back_spread_out_never_before_retry_after() -> None:
    policy = RetryPolicy(base=2.0)
    delays = [policy.delay(refused(5.0), 0, random.Random(seed)) for seed in range(200)]

    assert all(5.0 <= d <= 7.0 for d in delays)
    assert len(set(delays)) == len(delays)  # no two in lockstep
    assert statistics.pstdev(delays) > 0.4  # uniform over 2 s: about 0.58
    assert max(delays) - min(delays) > 1.8


def test_the_jitter_window_grows_with_each_attempt_up_to_the_cap() -> None:
    policy = RetryPolicy(base=1.0, cap=4.0)
    rng = random.Random(3)

    highest = [
        max(policy.delay(refused(0.0), attempt, rng) for _ in range(300)) for attempt in range(5)
    ]

    assert highest[0] <= 1.0 < highest[1] <= 2.0 < highest[2] <= 4.0
    assert highest[3] <= 4.0 and highest[4] <= 4.0


def test_a_retry_budget_allows_one_retry_per_ten_requests_once_its_burst_is_spent() -> None:
    budget = RetryBudget(ratio=0.1, burst=1)
    assert budget.try_spend()
    assert not budget.try_spend()

    for _ in range(9):
        budget.record_request()
    assert not budget.try_spend()
    budget.record_request()
    assert budget.try_spend()


def test_a_retry_budget_never_holds_more_than_its_burst() -> None:
    budget = RetryBudget(ratio=0.5, burst=3)
    for _ in range(100):
        budget.record_request()

    assert budget.tokens == 3


def test_a_refusal_without_retry_after_is_not_retried() -> None:
    waiter = Waiter(RetryPolicy(max_wait=60), RetryBudget(), random.Random(1))

    assert waiter.next_delay(refused(None)) is None


def test_an_outage_is_retried_with_jitter_within_max_wait() -> None:
    waiter = Waiter(RetryPolicy(max_wait=60, base=0.5), RetryBudget(), random.Random(1))

    delay = waiter.next_delay(refused(1.0, quotaclient.Unavailable))

    assert delay is not None and 1.0 <= delay <= 1.5


def test_a_wait_never_runs_past_max_wait() -> None:
    time_machine = TimeMachine()
    waiter = Waiter(
        RetryPolicy(max_wait=10, base=30), RetryBudget(), random.Random(1), time_machine.clock
    )
    time_machine.now += 4

    delay = waiter.next_delay(refused(5.0))

    assert delay is not None and 5.0 <= delay <= 6.0
