"""The provider's rate-limit headers, as a caller reports them at commit or release.

Understood: OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (resets as
durations such as `6m0s`, `1.2s`, `20ms`), Anthropic's
`anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`
(resets as RFC 3339 times) and `retry-after` (seconds or an HTTP date). Names are matched
without regard to case. Anything unknown or malformed is left out: a report never fails for
its headers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# Header names cut to their metric and part; the metric as the engine names it.
OPENAI = re.compile(r"^x-ratelimit-(limit|remaining|reset)-(requests|tokens)$")
ANTHROPIC = re.compile(
    r"^anthropic-ratelimit-(requests|tokens|input-tokens|output-tokens)-(limit|remaining|reset)$"
)
DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)(h|ms|m|s))+$")
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
UNIT_MS = {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
# Far enough for any provider's numbers, small enough for Lua's doubles to hold exactly.
MOST = 2**53
MAX_HEADERS = 200  # a report's headers looked at; a caller sending more sent junk
MAX_VALUE = 100  # characters of one value looked at

Reset = Callable[[str, datetime], "int | None"]


@dataclass(frozen=True, slots=True)
class ProviderLimits:
    """What the provider stated: by metric (`requests`, `tokens`, `input_tokens`,
    `output_tokens`), its `limit`, `remaining` and `reset_ms` (from now), each when given;
    and how long `retry-after` asked to wait."""

    metrics: dict[str, dict[str, int]] = field(default_factory=dict)
    retry_after_ms: int | None = None

    def for_engine(self) -> dict[str, dict[str, int]]:
        """The limits and remainders by metric, as pressure.lua reads them ({l, r})."""
        short = {"limit": "l", "remaining": "r"}
        return {
            metric: {short[k]: v for k, v in parts.items() if k in short}
            for metric, parts in self.metrics.items()
            if "limit" in parts or "remaining" in parts
        }


def provider_limits(headers: object, now: datetime | None = None) -> ProviderLimits:
    """The rate limits a provider's response headers state; unknown or malformed ones are
    ignored, and so is anything that is not a mapping of names to text or numbers."""
    if not isinstance(headers, Mapping):
        return ProviderLimits()
    now = now or datetime.now(UTC)
    metrics: dict[str, dict[str, int]] = {}
    retry_after = None
    for index, (raw_name, raw_value) in enumerate(headers.items()):
        if index >= MAX_HEADERS:
            break
        if not isinstance(raw_name, str):
            continue
        value = _text(raw_value)
        if value is None:
            continue
        name = raw_name.strip().lower()
        if name == "retry-after":
            retry_after = retry_after_ms(value, now)
            continue
        metric, part, reset = _named(name)
        if metric is None:
            continue
        number = reset(value, now) if part == "reset" else count(value)
        if number is not None:
            metrics.setdefault(metric, {})[part] = number
    return ProviderLimits(metrics, retry_after)


def _named(name: str) -> tuple[str | None, str, Reset]:
    found = OPENAI.match(name)
    if found:
        return found[2], found[1], _duration_reset
    found = ANTHROPIC.match(name)
    if found:
        return found[1].replace("-", "_"), found[2], time_until_ms
    return None, "", time_until_ms


def _duration_reset(value: str, _now: datetime) -> int | None:
    return duration_ms(value)


def _text(value: object) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str) or len(value) > MAX_VALUE:
        return None
    return value.strip()


def count(value: str) -> int | None:
    """A whole count of requests or tokens, or None."""
    if not value.isascii() or not value.isdigit():
        return None
    number = int(value)
    return number if number < MOST else None


def duration_ms(value: str) -> int | None:
    """OpenAI's reset durations: `6m0s`, `1.2s`, `20ms`, `1h2m3.5s`; None when malformed."""
    if not value.isascii() or not DURATION.match(value):
        return None
    total = sum(float(amount) * UNIT_MS[unit] for amount, unit in DURATION_PART.findall(value))
    return round(total) if total < MOST else None


def time_until_ms(value: str, now: datetime) -> int | None:
    """Milliseconds from `now` to an RFC 3339 time (Anthropic's resets), at least 0."""
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:  # RFC 3339 always has an offset: a bare time is malformed
        return None
    return max(0, round((when - now).total_seconds() * 1000))


def retry_after_ms(value: str, now: datetime) -> int | None:
    """`retry-after` as seconds (whole or with a fraction) or an HTTP date."""
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0, round((when - now).total_seconds() * 1000))
    if not 0 <= seconds < MOST / 1000:  # also NaN and infinities
        return None
    return round(seconds * 1000)
