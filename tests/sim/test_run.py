"""A short noisy-neighbour simulation on the real stack (live API server, real Redis, the SDK
and the real openai package against the simulator's fake provider) shows the story's outcome:
without the platform the flood gets the provider answering 429s and chat starves; with it,
chat is answered at once and in full, the flood uses what is left, and the provider never
answers 429."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sim.chart import chart
from sim.report import markdown, provider_429s, summaries, table
from sim.run import config_document, simulate
from sim.traffic import BATCH, CHAT, Scenario, chat_schedule

pytestmark = pytest.mark.slow

# Compressed: a faster model, a smaller account and smaller calls than the command's default
# (whose run takes a minute), in the same proportions: chat's calls are larger than the
# flood's chunks and chat needs about half the account.
SHORT = Scenario(
    seconds=6.0,
    warmup=1.0,
    tpm=18_000,
    rpm=1_200,
    chat_rate=2.0,
    chat_input=(40, 70),
    chat_max_tokens=40,
    chat_reply=(10, 35),
    chat_patience=2.5,
    batch_workers=12,
    batch_input=(25, 40),
    batch_max_tokens=30,
    batch_min_tokens=10,
    batch_reply=(20, 30),
    first_token_s=0.05,
    per_token_s=0.002,
)


def test_the_platform_keeps_chat_from_starving(
    live_server: Any, transactional_db: Any, tmp_path: Path
) -> None:
    without, with_ = simulate(str(live_server.url), SHORT)
    rows = {(row.run, row.feature): row for row in summaries([without, with_])}
    print(table(list(rows.values())))

    # Without the platform the provider throttles, and chat waits or gives up.
    assert provider_429s(without) > 0
    assert rows[without.name, CHAT].upstream_429s + rows[without.name, BATCH].upstream_429s > 0

    # With it, the provider never says 429, and chat is answered at once and in full.
    assert provider_429s(with_) == 0
    assert rows[with_.name, CHAT].upstream_429s == rows[with_.name, BATCH].upstream_429s == 0
    chat = rows[with_.name, CHAT]
    assert chat.calls > 0 and chat.gave_up == 0
    assert chat.refusals == 0 and chat.truncated == 0
    assert chat.p95_wait < 0.5
    assert rows[without.name, CHAT].p95_wait > chat.p95_wait

    # The flood still runs on what chat leaves, cut short (partial grants) rather than 429d.
    batch = rows[with_.name, BATCH]
    assert batch.calls > 0 and batch.refusals > 0

    assert chart([without, with_], tmp_path / "chart.png").stat().st_size > 10_000
    assert markdown(list(rows.values())).count("\n") == 5


def test_both_runs_replay_the_same_chat_traffic() -> None:
    assert chat_schedule(SHORT) == chat_schedule(SHORT)
    assert all(
        SHORT.warmup < at < SHORT.seconds - SHORT.chat_patience for at, _ in chat_schedule(SHORT)
    )


def test_without_the_platform_the_pool_has_no_limits() -> None:
    open_pool = config_document("p", SHORT, limited=False)
    limited = config_document("p", SHORT, limited=True)
    assert open_pool["limits"] == [] and "protect" not in open_pool["pools"][0]
    assert {(x["metric"], x["amount"]) for x in limited["limits"]} == {
        ("tokens", SHORT.tpm),
        ("requests", SHORT.rpm),
    }
    assert limited["pools"][0]["protect"] == {"interactive": SHORT.protect}


def test_the_fake_provider_throttles_like_a_token_bucket_and_truncates() -> None:
    import openai

    from sim.provider import Account, FakeProvider, Latency

    account = Account(tpm=6_000, rpm=600, chars_per_token=4.0)
    messages = [{"role": "user", "content": "x" * 400}]
    prompt = account.input_tokens(messages)
    with (
        FakeProvider(account, Latency(0.0, 0.0)) as provider,
        openai.OpenAI(base_url=provider.url, api_key="k", max_retries=0) as upstream,
    ):
        client: Any = upstream  # plain dicts as messages
        cut = client.chat.completions.create(
            model="m", messages=messages, max_tokens=20, extra_body={"reply_tokens": 50}
        )
        assert cut.choices[0].finish_reason == "length"
        assert (cut.usage.prompt_tokens, cut.usage.completion_tokens) == (prompt, 20)
        # What is left plus 100 tokens: 1 s of refill at 100 tokens/s
        too_much = 6_000 - (prompt + 20) - prompt + 100
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model="m", messages=messages, max_tokens=too_much)
        assert 980 <= int(refused.value.response.headers["retry-after-ms"]) <= 1000
    assert [(e.status, e.tokens) for e in account.entries()] == [(200, prompt + 20), (429, 0)]
