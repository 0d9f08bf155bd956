"""The before/after example of docs/sdk.md: the protected call site differs from the
original by two lines, and it works, against the real API server and a fake OpenAI."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import quotaclient._quota
import redis

from tests.fakes.providers import FakeOpenAI
from tests.fakes.stack import Stack, live_stack
from tests.fixtures import World

pytestmark = pytest.mark.django_db(transaction=True)

DOC = Path(__file__).resolve().parents[2] / "docs" / "sdk.md"


@pytest.fixture
def stack(
    live_server: Any, world: World, redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stack]:
    yield from live_stack(live_server, world, redis_db, monkeypatch)


def before_and_after() -> tuple[list[str], list[str]]:
    text = DOC.read_text()
    before = re.search(r"Before:\s*```python\n(.*?)```", text, re.S)
    after = re.search(r"After[^\n]*:\s*```python\n(.*?)```", text, re.S)
    assert before and after, "docs/sdk.md lost its before/after example"
    return before.group(1).splitlines(), after.group(1).splitlines()


def test_the_protected_call_site_differs_by_at_most_two_lines() -> None:
    before, after = before_and_after()
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    kept = sum(block.size for block in matcher.get_matching_blocks())

    assert max(len(before) - kept, len(after) - kept) <= 2
    assert "client.chat.completions.create(" in "\n".join(after)


def test_the_protected_call_site_reserves_and_commits(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, after = before_and_after()
    monkeypatch.setenv("QUOTA_URL", stack.url)
    monkeypatch.setenv("QUOTA_API_KEY", stack.world.secret)
    namespace: dict[str, Any] = {"question": "How are you?"}
    made = quotaclient._quota.QuotaClient
    monkeypatch.setattr(quotaclient._quota, "QuotaClient", lambda *a: stack.kept(made(*a)))

    with FakeOpenAI() as fake:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        monkeypatch.setenv("OPENAI_BASE_URL", f"{fake.url}/v1")
        exec("\n".join(after), namespace)

    assert namespace["reply"].choices[0].finish_reason == "stop"
    assert stack.event("reserved")["feature"] == "chat"
    committed = stack.event("committed")
    assert (committed["output_tokens"], committed["upstream_status"]) == ("20", "200")
