"""`wrap_anthropic`: the real `anthropic` package, pointed at a fake Anthropic server,
protected by the real quota server: `messages.create` (plain and streaming) and the
`messages.stream()` helper, sync and async."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
import quotaclient
import redis
from quotaclient import Quota, wrap_anthropic

from providers.models import Pool
from quotas.plan import plans
from tests.factories import LanguageModelFactory, PoolFactory, ProviderFactory
from tests.fakes.providers import FakeAnthropic
from tests.fakes.stack import Sleeper, Stack, live_stack
from tests.fixtures import World

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "claude-haiku-4-5"
HELLO = [{"role": "user", "content": "Say hello in twenty words."}]


@pytest.fixture
def stack(
    live_server: Any, world: World, redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stack]:
    provider = ProviderFactory(slug="anthropic")
    model = LanguageModelFactory(provider=provider, name=MODEL)
    PoolFactory(slug="anthropic-shared", provider=provider, served_models=[model])
    plans.clear()
    yield from live_stack(live_server, world, redis_db, monkeypatch)


@pytest.fixture
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        yield server


def protected(stack: Stack, fake: FakeAnthropic, **quota: Any) -> anthropic.Anthropic:
    return wrap_anthropic(
        anthropic.Anthropic(api_key="sk-ant-test", base_url=fake.url, max_retries=0),
        quota=Quota("chat", client=stack.client(), **quota),
    )


def test_a_scheduled_call_sleeps_until_its_start_before_calling_the_provider(
    stack: Stack, fake: FakeAnthropic
) -> None:
    stack.world.limit(feature=stack.world.chat, metric="tokens", window="minute", amount=1000)
    fake.script.reply_tokens = 800  # the first call uses what it reserved
    sleep = Sleeper(fake.requests)
    client = wrap_anthropic(
        anthropic.Anthropic(api_key="sk-ant-test", base_url=fake.url, max_retries=0),
        quota=Quota("chat", client=stack.client(sleep=sleep), max_wait=60),
    )
    client.messages.create(model=MODEL, messages=HELLO, max_tokens=800)

    client.messages.create(model=MODEL, messages=HELLO, max_tokens=800)

    reserved = stack.events("reserved")[-1]
    assert sleep.sleeps == [(int(reserved["wait_ms"]) / 1000, 1)]  # before the second call
    assert len(fake.requests) == 2 and stack.events("committed")[-1]["rid"] == reserved["rid"]


def committed(stack: Stack) -> tuple[str, str]:
    event = stack.event("committed")
    return event["output_tokens"], event["finish_reason"]


# -- messages.create -----------------------------------------------------------------------


def test_a_message_commits_its_usage_with_cache_reads_counted_as_input(
    stack: Stack, fake: FakeAnthropic
) -> None:
    fake.script.input_tokens, fake.script.cached_input_tokens = 42, 10
    client = protected(stack, fake)

    message = client.messages.create(model=MODEL, messages=HELLO, max_tokens=100)

    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 32  # Anthropic counts cache reads apart
    event = stack.event("committed")
    assert (event["input_tokens"], event["cached_input_tokens"]) == ("42", "10")
    assert (event["output_tokens"], event["finish_reason"]) == ("20", "stop")
    assert event["upstream_status"] == "200"
    assert stack.event("reserved")["model"] == MODEL


def test_stop_reason_max_tokens_is_committed_as_length(stack: Stack, fake: FakeAnthropic) -> None:
    fake.script.reply_tokens = 50
    client = protected(stack, fake)

    message = client.messages.create(model=MODEL, messages=HELLO, max_tokens=8)

    assert message.stop_reason == "max_tokens"
    assert committed(stack) == ("8", "length")


def test_the_system_prompt_and_tools_count_towards_the_estimate(
    stack: Stack, fake: FakeAnthropic
) -> None:
    client = protected(stack, fake)
    tool = {"name": "lookup", "description": "d " * 500, "input_schema": {"type": "object"}}

    client.messages.create(
        model=MODEL, system="s " * 2000, tools=[tool], messages=HELLO, max_tokens=10
    )

    # 5,000 characters of system prompt and tool description: far more than the question
    assert int(stack.event("reserved")["reserved_input_tokens"]) > 1000


def test_a_partial_grant_lowers_max_tokens(stack: Stack, fake: FakeAnthropic) -> None:
    stack.world.limit(feature=stack.world.chat, metric="output_tokens", window="minute", amount=300)
    fake.script.reply_tokens = 1000
    client = protected(stack, fake, min_output_tokens=100)

    message = client.messages.create(model=MODEL, messages=HELLO, max_tokens=4096)

    assert fake.requests[-1]["max_tokens"] == 300
    assert message.stop_reason == "max_tokens"
    assert committed(stack) == ("300", "length")


def test_an_upstream_error_is_committed_with_its_status(stack: Stack, fake: FakeAnthropic) -> None:
    fake.script.fail_status = 529  # overloaded
    client = protected(stack, fake)

    with pytest.raises(anthropic.APIStatusError):
        client.messages.create(model=MODEL, messages=HELLO, max_tokens=100)

    assert stack.event("committed")["upstream_status"] == "529"
    assert committed(stack) == ("0", "error")


def test_a_provider_429_is_released_with_its_headers_and_not_retried_past_the_budget(
    stack: Stack, fake: FakeAnthropic
) -> None:
    fake.script.fail_status = 429
    fake.script.headers = {"anthropic-ratelimit-requests-remaining": "0", "retry-after": "0"}
    client = wrap_anthropic(
        anthropic.Anthropic(api_key="sk-ant-test", base_url=fake.url),
        quota=Quota("chat", client=stack.client(budget=quotaclient.RetryBudget(burst=1))),
    )

    with pytest.raises(anthropic.RateLimitError):
        client.messages.create(model=MODEL, messages=HELLO, max_tokens=100)

    assert len(fake.requests) == 2  # one retry, through a new reservation
    assert [e["upstream_status"] for e in stack.events("released")] == ["429", "429"]


def test_the_providers_rate_limit_headers_are_committed(stack: Stack, fake: FakeAnthropic) -> None:
    stack.world.limit(pool=Pool.objects.get(slug="anthropic-shared"), metric="requests", amount=500)
    fake.script.headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "3",
        "anthropic-ratelimit-requests-reset": "2030-01-01T00:00:00Z",
    }
    client = protected(stack, fake)

    client.messages.create(model=MODEL, messages=HELLO, max_tokens=100)

    assert stack.event("committed")["upstream_status"] == "200"
    (limit,) = stack.events("provider_limit")
    assert (limit["metric"], limit["limit"], limit["configured"]) == ("requests", "50", "500")


# -- streams -------------------------------------------------------------------------------


def test_a_raw_event_stream_commits_the_usage_of_message_delta(
    stack: Stack, fake: FakeAnthropic
) -> None:
    client = protected(stack, fake)

    events = list(client.messages.create(model=MODEL, messages=HELLO, max_tokens=100, stream=True))

    assert events[0].type == "message_start" and events[-1].type == "message_stop"
    assert committed(stack) == ("20", "stop")
    assert stack.event("committed")["input_tokens"] == "42"


def test_a_truncated_raw_stream_commits_length(stack: Stack, fake: FakeAnthropic) -> None:
    client = protected(stack, fake)

    with client.messages.create(model=MODEL, messages=HELLO, max_tokens=3, stream=True) as events:
        for _ in events:
            pass

    assert committed(stack) == ("3", "length")


def test_the_stream_helper_commits_the_usage_of_its_final_message(
    stack: Stack, fake: FakeAnthropic
) -> None:
    client = protected(stack, fake)

    with client.messages.stream(model=MODEL, messages=HELLO, max_tokens=100) as stream:
        text = "".join(stream.text_stream)

    assert text.split() == [f"w{i}" for i in range(20)]
    assert committed(stack) == ("20", "stop")


def test_the_stream_helper_truncated_commits_length(stack: Stack, fake: FakeAnthropic) -> None:
    client = protected(stack, fake)

    with client.messages.stream(model=MODEL, messages=HELLO, max_tokens=6) as stream:
        final = stream.get_final_message()

    assert final.stop_reason == "max_tokens"
    assert committed(stack) == ("6", "length")


def test_a_stream_helper_left_before_its_end_is_charged_its_grant(
    stack: Stack, fake: FakeAnthropic
) -> None:
    client = protected(stack, fake)

    with client.messages.stream(model=MODEL, messages=HELLO, max_tokens=70) as stream:
        next(iter(stream))

    assert committed(stack) == ("70", "incomplete")


def test_a_stream_helper_never_entered_reserves_nothing(stack: Stack, fake: FakeAnthropic) -> None:
    client = protected(stack, fake)

    client.messages.stream(model=MODEL, messages=HELLO, max_tokens=70)

    assert stack.events() == []
    assert fake.requests == []


# -- asyncio -------------------------------------------------------------------------------


def async_protected(stack: Stack, fake: FakeAnthropic) -> anthropic.AsyncAnthropic:
    return wrap_anthropic(
        anthropic.AsyncAnthropic(api_key="sk-ant-test", base_url=fake.url, max_retries=0),
        quota=Quota("chat", async_client=stack.async_client()),
    )


def test_an_async_message_commits_its_usage(stack: Stack, fake: FakeAnthropic) -> None:
    async def main() -> str | None:
        message = await async_protected(stack, fake).messages.create(
            model=MODEL, messages=HELLO, max_tokens=100
        )
        return message.stop_reason

    assert stack.run(main()) == "end_turn"
    assert committed(stack) == ("20", "stop")


def test_an_async_raw_stream_commits_its_usage(stack: Stack, fake: FakeAnthropic) -> None:
    async def main() -> int:
        events = await async_protected(stack, fake).messages.create(
            model=MODEL, messages=HELLO, max_tokens=4, stream=True
        )
        return len([event async for event in events])

    assert stack.run(main()) > 4
    assert committed(stack) == ("4", "length")


def test_the_async_stream_helper_commits_its_usage(stack: Stack, fake: FakeAnthropic) -> None:
    async def main() -> str:
        client = async_protected(stack, fake)
        async with client.messages.stream(model=MODEL, messages=HELLO, max_tokens=100) as stream:
            return "".join([text async for text in stream.text_stream])

    assert len(stack.run(main()).split()) == 20
    assert committed(stack) == ("20", "stop")
