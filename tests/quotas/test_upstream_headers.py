"""The provider's rate-limit headers as a caller reports them: understood, or ignored."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotas.upstream_headers import duration_ms, provider_limits, retry_after_ms

NOW = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)


def test_openai_headers() -> None:
    limits = provider_limits(
        {
            "x-ratelimit-limit-requests": "500",
            "x-ratelimit-limit-tokens": "30000",
            "x-ratelimit-remaining-requests": "499",
            "X-RateLimit-Remaining-Tokens": "29500",
            "x-ratelimit-reset-requests": "120ms",
            "x-ratelimit-reset-tokens": "6m0s",
        },
        NOW,
    )

    assert limits.metrics == {
        "requests": {"limit": 500, "remaining": 499, "reset": 120},
        "tokens": {"limit": 30000, "remaining": 29500, "reset": 360_000},
    }
    assert limits.for_engine() == {
        "requests": {"l": 500, "r": 499},
        "tokens": {"l": 30000, "r": 29500},
    }


def test_anthropic_headers() -> None:
    limits = provider_limits(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": "2026-12-06T12:00:01Z",
            "anthropic-ratelimit-input-tokens-remaining": "39000",
            "anthropic-ratelimit-output-tokens-limit": "8000",
            "anthropic-ratelimit-tokens-reset": "2026-12-06T12:00:30.5+00:00",
            "retry-after": "7",
        },
        NOW,
    )

    assert limits.metrics == {
        "requests": {"limit": 50, "remaining": 49, "reset": 1000},
        "input_tokens": {"remaining": 39000},
        "output_tokens": {"limit": 8000},
        "tokens": {"reset": 30_500},
    }
    assert limits.retry_after_ms == 7000
    assert "tokens" not in limits.for_engine()  # a reset alone tells the engine nothing


@pytest.mark.parametrize(
    ("text", "ms"),
    [("6m0s", 360_000), ("1.2s", 1200), ("20ms", 20), ("1h2m3.5s", 3_723_500), ("0s", 0)],
)
def test_openai_durations(text: str, ms: int) -> None:
    assert duration_ms(text) == ms


@pytest.mark.parametrize("text", ["", "5", "s", "1.2", "-1s", "1d", "1 s", "½s", "1.s", "NaNs"])
def test_malformed_durations_are_none(text: str) -> None:
    assert duration_ms(text) is None


def test_retry_after_as_seconds_or_http_date() -> None:
    assert retry_after_ms("2", NOW) == 2000
    assert retry_after_ms("0.5", NOW) == 500
    assert retry_after_ms("Sun, 06 Dec 2026 12:00:10 GMT", NOW) == 10_000
    assert retry_after_ms("Sun, 06 Dec 2026 11:00:00 GMT", NOW) == 0  # past: now
    for junk in ("soon", "-3", "nan", "inf", "1e400", ""):
        assert retry_after_ms(junk, NOW) is None


def test_malformed_and_unknown_headers_are_ignored() -> None:
    limits = provider_limits(
        {
            "x-ratelimit-remaining-tokens": "-5",
            "x-ratelimit-limit-tokens": "12.5",
            "x-ratelimit-limit-requests": "١٢٣",  # digits, but not ASCII ones
            "x-ratelimit-reset-requests": "tomorrow",
            "anthropic-ratelimit-requests-reset": "2026-12-06T12:00:01",  # no offset
            "anthropic-ratelimit-tokens-remaining": ["1"],
            "anthropic-ratelimit-tokens-limit": True,
            "x-ratelimit-remaining-requests": "9" * 30,  # past any provider's numbers
            "x-custom": "1",
            "retry-after": {"s": 1},
        },
        NOW,
    )

    assert limits.metrics == {} and limits.retry_after_ms is None


def test_numbers_given_as_json_numbers_are_read() -> None:
    assert provider_limits({"x-ratelimit-remaining-tokens": 42}, NOW).metrics == {
        "tokens": {"remaining": 42}
    }


@pytest.mark.parametrize("headers", [None, "x", 5, [["x-ratelimit-limit-tokens", "1"]]])
def test_anything_but_a_mapping_states_nothing(headers: object) -> None:
    assert provider_limits(headers, NOW).metrics == {}


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
NAMES = st.sampled_from(
    [
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-tokens",
        "anthropic-ratelimit-output-tokens-reset",
        "anthropic-ratelimit-requests-remaining",
        "retry-after",
    ]
) | st.text(max_size=40)


@given(st.dictionaries(NAMES, JSON, max_size=12))
def test_any_json_object_parses_without_error_into_sane_numbers(headers: dict[str, object]) -> None:
    limits = provider_limits(headers, NOW)

    for metric, parts in limits.metrics.items():
        assert metric in ("requests", "tokens", "input_tokens", "output_tokens")
        assert all(type(v) is int and 0 <= v < 2**53 for v in parts.values())
    assert limits.retry_after_ms is None or limits.retry_after_ms >= 0


@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=999))
def test_durations_in_seconds_and_milliseconds_add_up(seconds: int, millis: int) -> None:
    assert duration_ms(f"{seconds}s{millis}ms") == seconds * 1000 + millis
