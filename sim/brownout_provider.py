"""The brownout scenario's fake provider account: the noisy-neighbour provider's buckets and
latency, but whose capacity drops for a while, which answers some calls 5xx, and which sends
the rate-limit headers a real provider sends, so the platform's header sync has them.

Headers, as OpenAI sends them, on every answer: `x-ratelimit-{limit,remaining,reset}-
{tokens,requests}` (the reset as a duration, `850ms`), and with a 429 `retry-after-ms` and
`retry-after`. They state the account's tier (its buckets as they would be without the
drop) unless the weather is `visible`, when they state what it can serve now; limits are
per real minute (the unit of the quota server's per-minute limits, whatever the
simulation's time compression).
"""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from sim.provider import Account, FakeProvider, Latency, _completion, _rate_limit_error


@dataclass(frozen=True)
class Weather:
    """When the account is degraded, in seconds since it opened: its capacity is `capacity`
    of normal from `start` to `end`, and from `errors_from` to `errors_to` it answers
    `error_rate` of the calls it admitted with a 500."""

    start: float = math.inf
    end: float = math.inf
    capacity: float = 1.0
    errors_from: float = math.inf
    errors_to: float = math.inf
    error_rate: float = 0.0
    # whether the rate-limit headers show the drop; in an incident they often do not (the
    # account's tier is unchanged, the provider is short of capacity and answers 429s)
    visible: bool = False

    def scale(self, at: float) -> float:
        return self.capacity if self.start <= at < self.end else 1.0

    def failing(self, at: float) -> float:
        return self.error_rate if self.errors_from <= at < self.errors_to else 0.0


@dataclass(frozen=True)
class Answer:
    """One answer of an account. `tokens`: what an answered call used (input + output), or
    what a failed one sent in vain (its input)."""

    at: float  # seconds since the account opened
    account: str
    feature: str
    status: int
    tokens: int


class Meter:
    """A token bucket of `depth`, refilled at `per_second`, both scaled by the account's
    capacity now (a drop in capacity also takes away what is above the smaller depth)."""

    def __init__(self, depth: float, per_second: float, at: float) -> None:
        self.depth, self.per_second = depth, per_second
        self.level, self.at = depth, at

    def refill(self, now: float, scale: float) -> None:
        grown = self.level + (now - self.at) * self.per_second * scale
        self.level, self.at = min(self.depth * scale, grown), now

    def shortfall_seconds(self, amount: float, scale: float) -> float:
        return max(0.0, (amount - self.level) / (self.per_second * scale))

    def headers(self, metric: str, scale: float) -> dict[str, str]:
        empty_ms = (self.depth * scale - self.level) / (self.per_second * scale) * 1000
        return {
            f"x-ratelimit-limit-{metric}": str(int(self.per_second * scale * 60)),
            f"x-ratelimit-remaining-{metric}": str(max(0, int(self.level))),
            f"x-ratelimit-reset-{metric}": f"{max(0, math.ceil(empty_ms))}ms",
        }


class Meters:
    """An account's tokens and requests buckets, at a scale of their normal capacity."""

    def __init__(self, tokens: tuple[float, float], requests: tuple[float, float], at: float):
        self.tokens, self.requests = Meter(*tokens, at=at), Meter(*requests, at=at)
        self.scale = 1.0

    def refill(self, now: float, scale: float) -> None:
        self.scale = scale
        self.tokens.refill(now, scale)
        self.requests.refill(now, scale)

    def shortfall_seconds(self, worst_case: int) -> float:
        return max(
            self.tokens.shortfall_seconds(worst_case, self.scale),
            self.requests.shortfall_seconds(1, self.scale),
        )

    def take(self, worst_case: int) -> None:
        self.tokens.level -= worst_case
        self.requests.level -= 1

    def give_back(self, unused: int) -> None:
        self.tokens.level = min(self.tokens.depth * self.scale, self.tokens.level + unused)

    def headers(self) -> dict[str, str]:
        return {
            **self.tokens.headers("tokens", self.scale),
            **self.requests.headers("requests", self.scale),
        }


class WeatheredAccount:
    """A provider account under `weather`, and its log; thread-safe.

    Two sets of buckets: the account's tier (what its rate-limit headers state, unless the
    weather is `visible`) and what the provider can serve it now (the tier's, scaled by the
    weather). A call needs room in both."""

    def __init__(
        self,
        name: str,
        tokens: tuple[float, float],
        requests: tuple[float, float],
        chars_per_token: float,
        weather: Weather,
        started: float,
        seed: int,
    ) -> None:
        """`tokens` and `requests`: (bucket depth, refill per second)."""
        self.name, self.weather, self.started = name, weather, started
        self.tier = Meters(tokens, requests, started)
        self.serving = Meters(tokens, requests, started)
        # counts input tokens with the quota server's estimator, as the other fake provider
        self.counter = Account(1, 1, chars_per_token)
        self.log: list[Answer] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def _refill(self) -> float:
        now = time.monotonic()
        self.tier.refill(now, 1.0)
        self.serving.refill(now, self.weather.scale(now - self.started))
        return now

    def admit(self, feature: str, input_tokens: int, worst_case: int) -> tuple[int, float]:
        """(status, seconds to wait): 200 debits the worst case; 429 when a bucket is short;
        500 (after the debit: the call started, then failed) in an error spell."""
        with self._lock:
            now = self._refill()
            wait = max(m.shortfall_seconds(worst_case) for m in (self.tier, self.serving))
            if wait > 0:
                self._record(now, feature, 429, input_tokens)
                return 429, wait
            self.tier.take(worst_case)
            self.serving.take(worst_case)
            if self._rng.random() < self.weather.failing(now - self.started):
                return 500, 0.0
            return 200, 0.0

    def finish(self, feature: str, status: int, unused: int, tokens: int) -> dict[str, str]:
        """Gives back what the call did not use, logs it; returns the rate-limit headers."""
        with self._lock:
            now = self._refill()
            self.tier.give_back(unused)
            self.serving.give_back(unused)
            self._record(now, feature, status, tokens)
            return self._headers()

    def headers(self) -> dict[str, str]:
        with self._lock:
            self._refill()
            return self._headers()

    def _headers(self) -> dict[str, str]:
        return (self.serving if self.weather.visible else self.tier).headers()

    def _record(self, now: float, feature: str, status: int, tokens: int) -> None:
        self.log.append(Answer(now - self.started, self.name, feature, status, tokens))

    def entries(self) -> list[Answer]:
        with self._lock:
            return list(self.log)


class WeatheredProvider(FakeProvider):
    """`WeatheredAccount` behind OpenAI's HTTP shape (the noisy-neighbour provider's server)."""

    def __init__(self, account: WeatheredAccount, latency: Latency) -> None:
        self.weathered = account
        super().__init__(account.counter, latency)

    def complete(self, request: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        account = self.weathered
        feature = str(request.get("user") or "unknown")
        input_tokens = account.counter.input_tokens(request.get("messages") or [])
        cap = int(request.get("max_completion_tokens") or request.get("max_tokens") or 4096)
        status, wait = account.admit(feature, input_tokens, input_tokens + cap)
        if status == 429:
            retry = {
                "retry-after-ms": str(math.ceil(wait * 1000)),
                "retry-after": str(math.ceil(wait)),
            }
            return 429, _rate_limit_error(), {**account.headers(), **retry}
        if status == 500:  # it read the prompt, then failed before answering
            time.sleep(self.latency.first_token_s)
            headers = account.finish(feature, 500, unused=cap, tokens=input_tokens)
            return (
                500,
                {"error": {"message": "The server had an error", "type": "server_error"}},
                headers,
            )
        said = min(int(request.get("reply_tokens") or cap), cap)
        time.sleep(self.latency.seconds(said))
        headers = account.finish(feature, 200, unused=cap - said, tokens=input_tokens + said)
        truncated = said < int(request.get("reply_tokens") or 0)
        return 200, _completion(request, input_tokens, said, truncated), headers
