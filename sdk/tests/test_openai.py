"""`wrap_openai`: the real `openai` package, pointed at a fake OpenAI server, protected by the
real quota server. What was reserved, sent upstream and committed is read back from the
fake's requests and the server's usage events."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import quotaclient
import redis
from quotaclient import Quota, wrap_openai

from quotas.store import get_engine
from tests.fakes.providers import FakeOpenAI
from tests.fakes.stack import Sleeper, Stack, live_stack
from tests.fixtures import World

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "gpt-4o-mini"
HELLO = [{"role": "user", "content": "Say hello in twenty words."}]


@pytest.fixture
def stack(
    live_server: Any, world: World, redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stack]:
    yield from live_stack(live_server, world, redis_db, monkeypatch)


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def protected(stack: Stack, fake: FakeOpenAI, **quota: Any) -> openai.OpenAI:
    return wrap_openai(
        openai.OpenAI(api_key="sk-test", base_url=f"{fake.url}/v1", max_retries=0),
        quota=Quota("chat", client=stack.client(), **quota),
    )


# -- plain answers -------------------------------------------------------------------------


def test_a_call_commits_the_providers_usage_and_finish_reason(
    stack: Stack, fake: FakeOpenAI
) -> None:
    fake.script.reply_tokens, fake.script.input_tokens, fake.script.cached_input_tokens = 20, 42, 10
    client = protected(stack, fake)

    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100)

    assert reply.choices[0].finish_reason == "stop"
    assert fake.requests[-1]["max_tokens"] == 100  # fully granted: unchanged
    reserved = stack.event("reserved")
    assert reserved["estimated"] == "1"  # the server estimated the input from the messages
    assert reserved["reserved_output_tokens"] == "100"
    committed = stack.event("committed")
    assert committed["rid"] == reserved["rid"]
    assert (committed["input_tokens"], committed["cached_input_tokens"]) == ("42", "10")
    assert committed["output_tokens"] == "20"
    assert (committed["finish_reason"], committed["upstream_status"]) == ("stop", "200")
    assert int(committed["latency_ms"]) >= 0


def test_a_truncated_answer_commits_finish_reason_length(stack: Stack, fake: FakeOpenAI) -> None:
    fake.script.reply_tokens = 50
    client = protected(stack, fake)

    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=10)

    assert reply.choices[0].finish_reason == "length"
    assert fake.requests[-1]["max_completion_tokens"] == 10
    committed = stack.event("committed")
    assert (committed["finish_reason"], committed["output_tokens"]) == ("length", "10")


def test_a_call_without_an_output_cap_gets_the_quotas_default(
    stack: Stack, fake: FakeOpenAI
) -> None:
    client = protected(stack, fake, max_output_tokens=64)

    client.chat.completions.create(model=MODEL, messages=HELLO)

    assert fake.requests[-1]["max_completion_tokens"] == 64
    assert stack.event("reserved")["reserved_output_tokens"] == "64"


def test_several_choices_reserve_the_cap_of_each(stack: Stack, fake: FakeOpenAI) -> None:
    client = protected(stack, fake)

    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100, n=3)

    assert stack.event("reserved")["reserved_output_tokens"] == "300"
    assert fake.requests[-1]["max_tokens"] == 100


def test_a_scheduled_call_sleeps_until_its_start_before_calling_the_provider(
    stack: Stack, fake: FakeOpenAI
) -> None:
    stack.world.limit(feature=stack.world.chat, metric="tokens", window="minute", amount=1000)
    fake.script.reply_tokens = 800  # the first call uses what it reserved
    sleep = Sleeper(fake.requests)
    client = wrap_openai(
        openai.OpenAI(api_key="sk-test", base_url=f"{fake.url}/v1", max_retries=0),
        quota=Quota("chat", client=stack.client(sleep=sleep), max_wait=60),
    )
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=800)

    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=800)

    reserved = stack.events("reserved")[-1]
    assert sleep.sleeps == [(int(reserved["wait_ms"]) / 1000, 1)]  # before the second call
    assert len(fake.requests) == 2 and stack.events("committed")[-1]["rid"] == reserved["rid"]


# -- partial grants and refusals -----------------------------------------------------------


def test_a_partial_grant_lowers_max_tokens(stack: Stack, fake: FakeOpenAI) -> None:
    stack.world.limit(feature=stack.world.chat, metric="tokens", window="minute", amount=600)
    fake.script.reply_tokens = 1000
    client = protected(stack, fake, min_output_tokens=50)

    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2000)

    granted = int(stack.event("reserved")["granted_output_tokens"])
    assert 50 <= granted < 600
    assert fake.requests[-1]["max_tokens"] == granted
    assert reply.choices[0].finish_reason == "length"
    committed = stack.event("committed")
    assert (committed["output_tokens"], committed["finish_reason"]) == (str(granted), "length")


def test_without_a_minimum_the_same_call_is_refused_and_never_sent(
    stack: Stack, fake: FakeOpenAI
) -> None:
    stack.world.limit(feature=stack.world.chat, metric="tokens", window="minute", amount=600)
    client = protected(stack, fake)

    with pytest.raises(quotaclient.RateLimited):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2000)

    assert fake.requests == []


def test_an_upstream_error_is_committed_with_its_status_and_nothing_used(
    stack: Stack, fake: FakeOpenAI
) -> None:
    fake.script.fail_status = 500
    client = protected(stack, fake)

    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100)

    committed = stack.event("committed")
    assert committed["upstream_status"] == "500"
    assert (committed["input_tokens"], committed["output_tokens"]) == ("0", "0")
    assert committed["finish_reason"] == "error"
    assert len(fake.requests) == 1  # the provider client's own retries are off


def test_the_providers_status_and_rate_limit_headers_are_committed(
    stack: Stack, fake: FakeOpenAI
) -> None:
    stack.world.limit(pool=stack.world.pool, metric="tokens", amount=100_000)
    fake.script.headers = {
        "x-ratelimit-limit-tokens": "30000",
        "x-ratelimit-remaining-tokens": "2000",
        "x-ratelimit-reset-tokens": "6m0s",
        "x-request-id": "not passed on",
    }
    client = wrap_openai(  # the caller's client retries; the wrapper turns that off
        openai.OpenAI(api_key="sk-test", base_url=f"{fake.url}/v1"),
        quota=Quota("chat", client=stack.client()),
    )
    engine = get_engine()
    engine.frozen_ms = engine.now_ms()  # no refill between the commit and the check

    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100)

    assert reply.usage is not None and reply.usage.completion_tokens == 20
    assert stack.event("committed")["upstream_status"] == "200"
    assert stack.events("provider_limit")[0]["limit"] == "30000"
    # the pool's bucket was lowered to the provider's remaining
    held = stack.client().reserve("chat", MODEL, input_tokens=10, max_output_tokens=10)
    pool_limit = next(lim for lim in held.grant.raw["limits"] if lim["scope"].get("pool"))
    assert pool_limit["remaining"] == 2000 - 20  # the provider's remaining, less this one
    held.release()


def test_a_provider_429_is_released_and_reserved_again_never_retried_by_the_client(
    stack: Stack, fake: FakeOpenAI
) -> None:
    fake.script.fail_status, fake.script.fail_times = 429, 1
    fake.script.headers = {"retry-after": "0", "x-ratelimit-remaining-requests": "0"}
    client = protected(stack, fake)

    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100)

    assert reply.choices[0].message.content
    released = stack.event("released")
    assert released["upstream_status"] == "429"
    assert stack.event("committed")["upstream_status"] == "200"
    assert len(stack.events("reserved")) == 2 and len(fake.requests) == 2


def test_provider_429s_stop_when_the_retry_budget_is_spent(stack: Stack, fake: FakeOpenAI) -> None:
    fake.script.fail_status = 429
    client = wrap_openai(
        openai.OpenAI(api_key="sk-test", base_url=f"{fake.url}/v1"),
        quota=Quota("chat", client=stack.client(budget=quotaclient.RetryBudget(burst=2))),
    )

    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100)

    assert len(fake.requests) == 3  # the first call and two retries the budget allowed
    assert [e["upstream_status"] for e in stack.events("released")] == ["429"] * 3
    assert not stack.events("committed")


def test_a_provider_that_cannot_be_reached_releases_the_reservation(stack: Stack) -> None:
    client = wrap_openai(
        openai.OpenAI(api_key="sk-test", base_url="http://127.0.0.1:9/v1", max_retries=0),
        quota=Quota("chat", client=stack.client()),
    )

    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100)

    assert stack.events("released")
    assert not stack.events("committed")


# -- streams -------------------------------------------------------------------------------


def test_a_stream_commits_the_usage_of_its_last_chunk_without_showing_it(
    stack: Stack, fake: FakeOpenAI
) -> None:
    fake.script.reply_tokens = 20
    client = protected(stack, fake)

    chunks = list(
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100, stream=True)
    )

    assert fake.requests[-1]["stream_options"] == {"include_usage": True}
    # the caller did not ask for the usage chunk: code reading chunk.choices[0] keeps working
    assert all(chunk.choices for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks).split() == [
        f"w{i}" for i in range(20)
    ]
    committed = stack.event("committed")
    assert (committed["output_tokens"], committed["finish_reason"]) == ("20", "stop")
    assert committed["input_tokens"] == "42"


def test_a_truncated_stream_commits_finish_reason_length(stack: Stack, fake: FakeOpenAI) -> None:
    fake.script.reply_tokens = 30
    client = protected(stack, fake)

    with client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=5, stream=True
    ) as stream:
        for _ in stream:
            pass

    committed = stack.event("committed")
    assert (committed["output_tokens"], committed["finish_reason"]) == ("5", "length")


def test_a_caller_who_asked_for_the_usage_chunk_gets_it(stack: Stack, fake: FakeOpenAI) -> None:
    client = protected(stack, fake)

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=100,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 20
    assert stack.event("committed")["output_tokens"] == "20"


def test_a_slow_stream_keeps_its_lease_past_its_ttl(stack: Stack, fake: FakeOpenAI) -> None:
    fake.script.reply_tokens, fake.script.token_delay = 25, 0.1  # 2.5 s, the ttl is 1 s
    client = protected(stack, fake, ttl_seconds=1)
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=100, stream=True
    )
    started = time.monotonic()
    status_mid_stream = None

    for _ in stream:
        if status_mid_stream is None and time.monotonic() - started > 1.5:
            rid = stack.event("reserved")["rid"]
            # reading a lease past its expiry expires it: held means it was extended
            status_mid_stream = stack.client().get(rid)["status"]

    assert status_mid_stream == "held"
    committed = stack.event("committed")
    assert committed.get("lease_expired", "0") != "1"
    assert not stack.events("expired")
    assert committed["output_tokens"] == "25"


def test_a_stream_closed_early_is_charged_its_whole_grant(stack: Stack, fake: FakeOpenAI) -> None:
    fake.script.reply_tokens = 50
    client = protected(stack, fake)
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=80, stream=True)

    for seen, _ in enumerate(stream):
        if seen == 2:
            break
    stream.close()

    committed = stack.event("committed")
    # what it generated before the close is unknown: charged as granted, like an expiry
    assert (committed["output_tokens"], committed["finish_reason"]) == ("80", "incomplete")


# -- the client around the protected call --------------------------------------------------


def test_everything_but_chat_completions_is_the_clients_own(stack: Stack, fake: FakeOpenAI) -> None:
    raw = openai.OpenAI(api_key="sk-test", base_url=f"{fake.url}/v1")
    client = wrap_openai(raw, quota=Quota("chat", client=stack.client()))

    assert client.models is raw.models
    assert client.chat.completions.with_raw_response is not None
    assert str(client.base_url) == str(raw.base_url)


def test_a_client_used_as_a_context_manager_stays_protected(stack: Stack, fake: FakeOpenAI) -> None:
    with protected(stack, fake) as client:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10)

    assert stack.event("committed")["output_tokens"] == "10"


def test_a_client_copied_with_options_stays_protected(stack: Stack, fake: FakeOpenAI) -> None:
    client = protected(stack, fake).with_options(timeout=5)

    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10)

    assert stack.event("committed")["output_tokens"] == "10"


# -- asyncio -------------------------------------------------------------------------------


def async_protected(stack: Stack, fake: FakeOpenAI) -> openai.AsyncOpenAI:
    return wrap_openai(
        openai.AsyncOpenAI(api_key="sk-test", base_url=f"{fake.url}/v1", max_retries=0),
        quota=Quota("chat", async_client=stack.async_client()),
    )


def test_an_async_call_commits_its_usage(stack: Stack, fake: FakeOpenAI) -> None:
    fake.script.reply_tokens = 30

    async def main() -> str | None:
        reply = await async_protected(stack, fake).chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=12
        )
        return reply.choices[0].finish_reason

    assert stack.run(main()) == "length"
    committed = stack.event("committed")
    assert (committed["output_tokens"], committed["finish_reason"]) == ("12", "length")


def test_an_async_stream_commits_its_usage(stack: Stack, fake: FakeOpenAI) -> None:
    async def main() -> int:
        stream = await async_protected(stack, fake).chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=100, stream=True
        )
        return len([chunk async for chunk in stream if chunk.choices])

    assert stack.run(main()) == 21  # twenty words and the finish
    committed = stack.event("committed")
    assert (committed["output_tokens"], committed["finish_reason"]) == ("20", "stop")
