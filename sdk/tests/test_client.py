"""The SDK's sync client against the real API server: commit on success, release on an
exception, a lease kept alive while a long call runs, refusals as typed errors."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import quotaclient
import redis
from django.conf import settings
from quotaclient import QuotaClient

import quotas.reservations
from quotas.engine.core import Engine
from quotas.plan import plans
from quotas.store import redis_client
from tests.fakes.stack import Stack, live_stack
from tests.fixtures import DEAD_STORE, World

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def stack(
    live_server: Any, world: World, redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stack]:
    yield from live_stack(live_server, world, redis_db, monkeypatch)


@pytest.fixture
def client(stack: Stack) -> Iterator[QuotaClient]:
    with stack.client() as client:
        yield client


@pytest.fixture
def day_budget(stack: Stack) -> Any:
    """A budget that does not refill, so what is held and used can be read exactly."""
    return stack.world.limit(
        tenant=stack.world.tenant, metric="tokens", window="day", amount=10_000
    )


def used(client: QuotaClient, limit_id: int) -> int:
    limits = client.feature_usage("chat")["limits"]
    return int(next(lim for lim in limits if lim["id"] == limit_id)["used"])


def reserve(client: QuotaClient, **options: Any) -> quotaclient.Reservation:
    options.setdefault("input_tokens", 100)
    options.setdefault("max_output_tokens", 400)
    return client.reserve("chat", "gpt-4o-mini", **options)


# -- commit and release --------------------------------------------------------------------


def test_a_block_that_succeeds_commits_the_usage_it_was_given(
    client: QuotaClient, day_budget: Any, stack: Stack
) -> None:
    with reserve(client) as reservation:
        assert used(client, day_budget.id) == 500  # the worst case is held
        reservation.record_usage(90, 30, finish_reason="stop", upstream_status=200)

    settled = reservation.settlement
    assert settled is not None and settled.status == "committed"
    assert (settled.input_tokens, settled.output_tokens) == (90, 30)
    assert (settled.refunded_input_tokens, settled.refunded_output_tokens) == (10, 370)
    assert used(client, day_budget.id) == 120
    committed = stack.event("committed")
    assert (committed["finish_reason"], committed["upstream_status"]) == ("stop", "200")
    assert int(committed["latency_ms"]) >= 0


def test_a_block_that_raises_releases_the_reservation(client: QuotaClient, day_budget: Any) -> None:
    with pytest.raises(TimeoutError), reserve(client) as reservation:
        raise TimeoutError("the provider did not answer")

    assert reservation.settlement is not None
    assert reservation.settlement.status == "released"
    assert client.get(reservation.id)["status"] == "released"
    assert used(client, day_budget.id) == 0


def test_usage_recorded_before_an_exception_is_committed_not_released(
    client: QuotaClient, day_budget: Any
) -> None:
    with pytest.raises(ValueError), reserve(client) as reservation:
        reservation.record_usage(100, 50, finish_reason="stop")
        raise ValueError("parsing the answer failed after the tokens were spent")

    assert client.get(reservation.id)["status"] == "committed"
    assert used(client, day_budget.id) == 150


def test_a_block_that_reports_no_usage_is_charged_as_reserved(
    client: QuotaClient, day_budget: Any
) -> None:
    with reserve(client) as reservation:
        pass

    assert client.get(reservation.id)["status"] == "committed"
    assert used(client, day_budget.id) == 500


def test_an_explicit_commit_is_not_repeated_on_the_way_out(
    client: QuotaClient, stack: Stack
) -> None:
    with reserve(client) as reservation:
        settled = reservation.commit(100, 7, finish_reason="length")

    assert settled.output_tokens == 7
    assert len(stack.events("committed")) == 1


def test_messages_are_sent_for_the_server_to_estimate_the_input(client: QuotaClient) -> None:
    text = {"type": "text", "text": "Hello " * 100}
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 9000}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [text, image]},
    ]

    with client.reserve(
        "chat", "gpt-4o-mini", messages=messages, max_output_tokens=10
    ) as reservation:
        reservation.record_usage(150, 10)

    assert reservation.grant.input_tokens_estimated
    # 600 characters of text at the factory model's characters per token, plus framing
    assert 100 < reservation.input_tokens < 400


def test_a_partial_grant_is_reported(client: QuotaClient, stack: Stack) -> None:
    stack.world.limit(feature=stack.world.chat, metric="tokens", window="minute", amount=1000)

    reservation = reserve(client, max_output_tokens=5000, min_output_tokens=100)

    assert reservation.partial
    assert 100 <= reservation.output_tokens <= 900
    reservation.release()


# -- the lease -----------------------------------------------------------------------------


def test_a_long_call_keeps_its_lease_alive(client: QuotaClient) -> None:
    with reserve(client, ttl_seconds=1) as reservation:
        first_expiry = reservation.expires_at
        time.sleep(1.6)
        # reading a lease past its expiry expires it: still held means it was extended
        assert client.get(reservation.id)["status"] == "held"
        time.sleep(1.0)
        reservation.record_usage(100, 20)

    assert reservation.settlement is not None
    assert reservation.settlement.status == "committed"
    assert not reservation.settlement.lease_expired
    assert first_expiry is not None and reservation.expires_at is not None
    assert reservation.expires_at > first_expiry


def test_a_lease_is_no_longer_extended_once_settled(client: QuotaClient, stack: Stack) -> None:
    with reserve(client, ttl_seconds=1) as reservation:
        reservation.record_usage(100, 20)
    settled_at = reservation.expires_at

    time.sleep(0.8)

    assert reservation.expires_at == settled_at
    assert client.get(reservation.id)["status"] == "committed"


# -- refusals ------------------------------------------------------------------------------


def test_a_short_minute_limit_raises_rate_limited_with_the_limit_and_retry_after(
    client: QuotaClient, stack: Stack
) -> None:
    limit = stack.world.limit(
        feature=stack.world.chat, metric="tokens", window="minute", amount=1000
    )
    reserve(client, input_tokens=100, max_output_tokens=700)

    with pytest.raises(quotaclient.RateLimited) as refused:
        reserve(client, input_tokens=100, max_output_tokens=700)

    error = refused.value
    assert isinstance(error, quotaclient.Refused)
    assert error.status == 429
    assert error.limit is not None
    assert (error.limit.id, error.limit.metric, error.limit.window) == (
        limit.id,
        "tokens",
        "minute",
    )
    assert error.limit.limit == 1000
    # 800 needed, ~200 left, refilling 1000 a minute: about 36 s
    assert error.retry_after is not None and 30 <= error.retry_after <= 36


def test_an_exhausted_day_budget_raises_budget_exhausted(client: QuotaClient, stack: Stack) -> None:
    stack.world.limit(feature=stack.world.chat, metric="tokens", window="day", amount=600)
    reserve(client)

    with pytest.raises(quotaclient.BudgetExhausted) as refused:
        reserve(client)

    assert refused.value.limit is not None and refused.value.limit.window == "day"
    assert refused.value.retry_after is not None and refused.value.retry_after > 0


def test_a_request_no_limit_can_ever_admit_has_no_retry_after(
    client: QuotaClient, stack: Stack
) -> None:
    stack.world.limit(feature=stack.world.chat, metric="tokens", window="minute", amount=100)

    with pytest.raises(quotaclient.RateLimited) as refused:
        reserve(client, max_wait=60)

    assert refused.value.retry_after is None


def test_a_paused_feature_raises_feature_paused(client: QuotaClient, stack: Stack) -> None:
    stack.world.chat.status = "paused"
    stack.world.chat.save()
    plans.clear()

    with pytest.raises(quotaclient.FeaturePaused) as refused:
        reserve(client)

    assert refused.value.status == 423


def test_a_store_outage_on_a_fail_closed_pool_raises_unavailable(
    client: QuotaClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = Engine(
        redis_client(DEAD_STORE),
        hash_tag=settings.QUOTA_HASH_TAG,
    )
    monkeypatch.setattr(quotas.reservations, "get_engine", lambda: dead)

    with pytest.raises(quotaclient.Unavailable) as refused:
        reserve(client)

    assert refused.value.status == 503
    assert refused.value.retry_after == 1


def test_a_server_that_does_not_answer_raises_unreachable() -> None:
    client = QuotaClient("http://127.0.0.1:9", "qk_none", timeout=0.5, sleep=lambda s: None)

    with pytest.raises(quotaclient.Unreachable) as refused:
        reserve(client)

    assert isinstance(refused.value, quotaclient.Unavailable)


def test_bad_requests_name_their_fields(client: QuotaClient) -> None:
    with pytest.raises(quotaclient.InvalidRequest) as refused:
        reserve(client, priority="urgent")

    assert set(refused.value.fields) == {"priority"}


def test_an_unknown_model_is_not_found(client: QuotaClient) -> None:
    with pytest.raises(quotaclient.NotFound):
        client.reserve("chat", "gpt-99", input_tokens=1, max_output_tokens=1)


def test_an_unknown_key_is_unauthenticated(stack: Stack) -> None:
    with (
        QuotaClient(stack.url, "qk_unknown.secret") as client,
        pytest.raises(quotaclient.Unauthenticated),
    ):
        reserve(client)


def test_giving_two_inputs_is_refused_before_anything_is_sent(client: QuotaClient) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        client.reserve("chat", "gpt-4o-mini", input_tokens=1, prompt="hi", max_output_tokens=1)


def test_the_sdk_imports_neither_django_nor_any_server_app() -> None:
    code = (
        "import sys, quotaclient; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('django', 'rest_framework', 'quotas', 'tenants', 'providers', 'ledger', "
        "'openai', 'anthropic')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr
