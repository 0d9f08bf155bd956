"""Wrapped clients in code written for the providers alone: refusals caught as the library's
`RateLimitError`, calls without `max_tokens`, models the quota server does not know, and a
quota server out of reach (`on_unreachable`). The real `openai` and `anthropic` packages,
pointed at fake providers, protected by the real quota server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
import quotaclient
import redis
from quotaclient import AsyncQuotaClient, Quota, QuotaClient, wrap_anthropic, wrap_openai
from quotaclient._offline import Backlog, Unreported
from quotaclient._types import Usage

from quotas.plan import plans
from tests.factories import LanguageModelFactory, PoolFactory, ProviderFactory
from tests.fakes.providers import FakeAnthropic, FakeOpenAI
from tests.fakes.stack import Stack, live_stack
from tests.fixtures import World

pytestmark = pytest.mark.django_db(transaction=True)

GPT, CLAUDE = "gpt-4o-mini", "claude-haiku-4-5"
HELLO = [{"role": "user", "content": "Say hello in twenty words."}]
NOBODY_LISTENS = "http://127.0.0.1:1"  # connection refused at once


@pytest.fixture
def stack(
    live_server: Any, world: World, redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stack]:
    provider = ProviderFactory(slug="anthropic")
    model = LanguageModelFactory(provider=provider, name=CLAUDE)
    PoolFactory(slug="anthropic-shared", provider=provider, served_models=[model])
    plans.clear()
    yield from live_stack(live_server, world, redis_db, monkeypatch)


@pytest.fixture
def gpt() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def claude() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        yield server


def openai_client(fake: FakeOpenAI, quota: Quota) -> openai.OpenAI:
    return wrap_openai(
        openai.OpenAI(api_key="sk-test", base_url=f"{fake.url}/v1", max_retries=0), quota=quota
    )


def anthropic_client(fake: FakeAnthropic, quota: Quota) -> anthropic.Anthropic:
    return wrap_anthropic(
        anthropic.Anthropic(api_key="sk-ant-test", base_url=fake.url, max_retries=0),
        quota=quota,
    )


def one_request_a_minute(stack: Stack) -> None:
    stack.world.limit(feature=stack.world.chat, metric="requests", window="minute", amount=1)


# -- refusals are the library's RateLimitError -----------------------------------------------


def test_an_openai_refusal_is_caught_as_openai_rate_limit_error(
    stack: Stack, gpt: FakeOpenAI
) -> None:
    one_request_a_minute(stack)
    client = openai_client(gpt, Quota("chat", client=stack.client()))
    client.chat.completions.create(model=GPT, messages=HELLO, max_tokens=50)

    try:  # as code written for the provider's own 429s reads it
        client.chat.completions.create(model=GPT, messages=HELLO, max_tokens=50)
    except openai.RateLimitError as error:
        caught: Any = error
    else:
        pytest.fail("the refusal was not an openai.RateLimitError")

    assert isinstance(caught, quotaclient.RateLimited)
    assert caught.status_code == 429
    assert 0 < caught.retry_after <= 60
    assert int(caught.response.headers["retry-after"]) >= caught.retry_after
    assert caught.limit is not None and caught.limit.metric == "requests"
    assert caught.body["error"] == "rate_limited"
    assert len(gpt.requests) == 1  # the refused call never reached the provider


def test_an_anthropic_refusal_is_caught_as_anthropic_rate_limit_error(
    stack: Stack, claude: FakeAnthropic
) -> None:
    one_request_a_minute(stack)
    client = anthropic_client(claude, Quota("chat", client=stack.client()))
    client.messages.create(model=CLAUDE, messages=HELLO, max_tokens=50)

    with pytest.raises(anthropic.RateLimitError) as refused:
        client.messages.create(model=CLAUDE, messages=HELLO, max_tokens=50)

    assert isinstance(refused.value, quotaclient.RateLimited)
    assert refused.value.retry_after is not None and refused.value.retry_after > 0
    stream = client.messages.stream(model=CLAUDE, messages=HELLO, max_tokens=50)
    with pytest.raises(anthropic.RateLimitError), stream:  # it reserves on entering
        pass
    assert len(claude.requests) == 1


def test_a_spent_budget_is_a_rate_limit_error_and_a_paused_feature_is_not(
    stack: Stack, gpt: FakeOpenAI
) -> None:
    stack.world.limit(feature=stack.world.chat, metric="requests", window="day", amount=1)
    client = openai_client(gpt, Quota("chat", client=stack.client()))
    client.chat.completions.create(model=GPT, messages=HELLO, max_tokens=50)

    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=GPT, messages=HELLO, max_tokens=50)
    assert isinstance(refused.value, quotaclient.BudgetExhausted)

    stack.world.chat.status = "paused"
    stack.world.chat.save()
    plans.clear()
    with pytest.raises(quotaclient.FeaturePaused) as paused:
        client.chat.completions.create(model=GPT, messages=HELLO, max_tokens=50)
    assert not isinstance(paused.value, openai.RateLimitError)  # waiting would not help


def test_an_async_refusal_is_an_openai_rate_limit_error(stack: Stack, gpt: FakeOpenAI) -> None:
    one_request_a_minute(stack)
    client = wrap_openai(
        openai.AsyncOpenAI(api_key="sk-test", base_url=f"{gpt.url}/v1", max_retries=0),
        quota=Quota("chat", async_client=stack.async_client()),
    )

    async def main() -> BaseException | None:
        await client.chat.completions.create(model=GPT, messages=HELLO, max_tokens=50)
        try:
            await client.chat.completions.create(model=GPT, messages=HELLO, max_tokens=50)
        except openai.RateLimitError as error:
            return error
        return None

    assert isinstance(stack.run(main()), quotaclient.RateLimited)


# -- calls without max_tokens --------------------------------------------------------------


def test_a_call_without_max_tokens_reserves_the_default_and_commits_what_it_used(
    stack: Stack, gpt: FakeOpenAI
) -> None:
    gpt.script.reply_tokens = 20
    client = openai_client(gpt, Quota("chat", client=stack.client(), default_output_tokens=300))

    reply = client.chat.completions.create(model=GPT, messages=HELLO)

    assert reply.choices[0].finish_reason == "stop"
    assert stack.event("reserved")["reserved_output_tokens"] == "300"
    sent = gpt.requests[-1]
    assert "max_tokens" not in sent and "max_completion_tokens" not in sent  # as it was
    assert stack.event("committed")["output_tokens"] == "20"


def test_the_default_is_1024_output_tokens(stack: Stack, gpt: FakeOpenAI) -> None:
    client = openai_client(gpt, Quota("chat", client=stack.client()))

    client.chat.completions.create(model=GPT, messages=HELLO)

    assert stack.event("reserved")["reserved_output_tokens"] == "1024"


# -- models the quota server does not know ---------------------------------------------------


def test_an_unknown_model_is_reserved_as_the_fallback_model(stack: Stack, gpt: FakeOpenAI) -> None:
    quota = Quota("chat", client=stack.client(), fallback_model=GPT, metadata={"team": "web"})
    client = openai_client(gpt, quota)

    client.chat.completions.create(model="gpt-9-preview", messages=HELLO, max_tokens=50)

    assert gpt.requests[-1]["model"] == "gpt-9-preview"  # the call is the caller's
    reserved = stack.event("reserved")
    assert reserved["model"] == GPT  # priced and limited as the fallback
    assert json.loads(reserved["metadata"]) == {"team": "web", "model": "gpt-9-preview"}
    assert stack.event("committed")["output_tokens"] == "20"


def test_without_a_fallback_an_unknown_model_is_not_found_and_never_sent(
    stack: Stack, gpt: FakeOpenAI
) -> None:
    client = openai_client(gpt, Quota("chat", client=stack.client()))

    with pytest.raises(quotaclient.NotFound):
        client.chat.completions.create(model="gpt-9-preview", messages=HELLO, max_tokens=50)

    assert gpt.requests == []


def test_an_unknown_feature_is_not_found_even_with_a_fallback_model(
    stack: Stack, gpt: FakeOpenAI
) -> None:
    client = openai_client(gpt, Quota("no-such", client=stack.client(), fallback_model=GPT))

    with pytest.raises(quotaclient.NotFound):
        client.chat.completions.create(model="gpt-9-preview", messages=HELLO, max_tokens=50)


# -- a quota server out of reach ---------------------------------------------------------------


def no_wait(seconds: float) -> None:
    return None


async def no_wait_async(seconds: float) -> None:
    return None


def unreachable(stack: Stack) -> QuotaClient:
    return stack.kept(QuotaClient(NOBODY_LISTENS, stack.world.secret, sleep=no_wait))


def test_by_default_an_unreachable_quota_server_fails_the_call(
    stack: Stack, gpt: FakeOpenAI
) -> None:
    client = openai_client(gpt, Quota("chat", client=unreachable(stack)))

    with pytest.raises(quotaclient.Unreachable):
        client.chat.completions.create(model=GPT, messages=HELLO, max_tokens=50)

    assert gpt.requests == []


def test_allowed_calls_go_through_and_are_recorded_once_the_server_is_back(
    stack: Stack, gpt: FakeOpenAI
) -> None:
    gpt.script.reply_tokens, gpt.script.input_tokens = 20, 42
    quota = Quota("chat", client=unreachable(stack), on_unreachable="allow")
    client = openai_client(gpt, quota)

    reply = client.chat.completions.create(model=GPT, messages=HELLO, max_tokens=50)

    assert reply.choices[0].finish_reason == "stop"
    assert gpt.requests[-1]["max_tokens"] == 50  # sent as asked
    assert len(quota.backlog) == 1 and stack.events() == []

    quota.client = stack.client()  # the quota server answers again
    client.chat.completions.create(model=GPT, messages=HELLO, max_tokens=50)

    assert len(quota.backlog) == 0
    replayed, live = stack.events("committed")
    assert (replayed["input_tokens"], replayed["output_tokens"]) == ("42", "20")
    assert replayed["finish_reason"] == "stop"
    assert live["output_tokens"] == "20"
    # the live call's reservation, then the replay's: exactly the allowed call's usage
    assert [e["reserved_output_tokens"] for e in stack.events("reserved")] == ["50", "20"]


def test_an_async_client_lets_calls_through_and_reports_them_later(
    stack: Stack, gpt: FakeOpenAI
) -> None:
    gone = AsyncQuotaClient(NOBODY_LISTENS, stack.world.secret, sleep=no_wait_async)
    quota = Quota("chat", async_client=gone, on_unreachable="allow")
    client = wrap_openai(
        openai.AsyncOpenAI(api_key="sk-test", base_url=f"{gpt.url}/v1", max_retries=0),
        quota=quota,
    )

    async def main() -> None:
        await client.chat.completions.create(model=GPT, messages=HELLO, max_tokens=50)
        assert len(quota.backlog) == 1
        await gone.aclose()
        quota.async_client = stack.async_client()
        await client.chat.completions.create(model=GPT, messages=HELLO, max_tokens=50)

    stack.run(main())

    assert len(quota.backlog) == 0
    assert [e["output_tokens"] for e in stack.events("committed")] == ["20", "20"]


def test_a_replay_the_limits_refuse_stays_in_the_backlog(stack: Stack, gpt: FakeOpenAI) -> None:
    quota = Quota("chat", client=unreachable(stack), on_unreachable="allow")
    client = openai_client(gpt, quota)
    for _ in range(2):
        client.chat.completions.create(model=GPT, messages=HELLO, max_tokens=50)
    stack.world.limit(feature=stack.world.chat, metric="requests", window="minute", amount=2)

    quota.client = stack.client()
    client.chat.completions.create(model=GPT, messages=HELLO, max_tokens=50)

    assert len(stack.events("committed")) == 2  # the live call and the first allowed one
    assert len(quota.backlog) == 1  # the second waits for the limit to refill


def test_the_backlog_is_bounded_and_drops_the_oldest(caplog: pytest.LogCaptureFixture) -> None:
    backlog = Backlog(size=2)
    entries = [Unreported("chat", GPT, Usage(n, n), {}) for n in (1, 2, 3)]

    for entry in entries:
        backlog.add(entry)

    assert len(backlog) == 2
    assert list(backlog._entries) == entries[1:]
    assert "usage backlog full" in caplog.text


def test_on_unreachable_takes_raise_or_allow() -> None:
    with pytest.raises(ValueError, match="on_unreachable"):
        Quota("chat", on_unreachable="ignore")  # type: ignore[arg-type]
