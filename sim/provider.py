"""A fake LLM provider on 127.0.0.1 that rate-limits like the real ones.

It speaks OpenAI's Chat Completions shape, so the real `openai` package can be pointed at it.
Like OpenAI it holds a tokens-per-minute and a requests-per-minute token bucket per account:
a call takes its input tokens plus its `max_tokens` (the worst case) and one request when it
is admitted, is answered 429 with `retry-after-ms` when either bucket is short, and gives
back the output it did not use when it finishes. It counts input tokens with the quota
server's own estimator, so "the provider's tokenizer" and the platform agree exactly.

The model "wants" to say `reply_tokens` tokens (sent by the simulator in the request body)
and is cut at `max_tokens`, saying `finish_reason: length`, with every HTTP status a 200.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from quotas.estimate import estimate_tokens
from sim.local_server import LocalServer


@dataclass
class Bucket:
    """A continuously refilling bucket of `capacity` per minute, full at start."""

    capacity: float
    level: float = -1.0
    at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.level < 0:
            self.level = self.capacity

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.capacity / 60)
        self.at = now

    def shortfall_seconds(self, amount: float) -> float:
        """Seconds until `amount` fits (0 when it fits now); call after refill()."""
        return max(0.0, (amount - self.level) * 60 / self.capacity)


@dataclass(frozen=True)
class Latency:
    """Time to first token plus a fixed time per output token, as models stream."""

    first_token_s: float = 0.15
    per_token_s: float = 0.004

    def seconds(self, output_tokens: int) -> float:
        return self.first_token_s + self.per_token_s * output_tokens


@dataclass(frozen=True)
class Entry:
    """One answer the provider gave: admitted (200) or throttled (429)."""

    at: float  # seconds since the provider started
    feature: str
    status: int
    tokens: int = 0  # input + output actually used (admitted calls)


class Account:
    """The provider account's limits and its log; thread-safe."""

    def __init__(
        self, tpm: int, rpm: int, chars_per_token: float, tokens_left: float | None = None
    ) -> None:
        self.tokens = Bucket(tpm, tpm if tokens_left is None else tokens_left)
        self.requests = Bucket(rpm)
        self.chars_per_token = chars_per_token
        self.started = time.monotonic()
        self.log: list[Entry] = []
        self._lock = threading.Lock()

    def admit(self, feature: str, worst_case: int) -> float:
        """Debits a call's worst case; returns 0, or the seconds to wait when it is short."""
        with self._lock:
            now = time.monotonic()
            self.tokens.refill(now)
            self.requests.refill(now)
            wait = max(
                self.tokens.shortfall_seconds(worst_case), self.requests.shortfall_seconds(1)
            )
            if wait > 0:
                self.log.append(Entry(now - self.started, feature, 429))
                return wait
            self.tokens.level -= worst_case
            self.requests.level -= 1
            return 0.0

    def finish(self, feature: str, unused: int, used: int) -> None:
        with self._lock:
            now = time.monotonic()
            self.tokens.refill(now)
            self.tokens.level = min(self.tokens.capacity, self.tokens.level + unused)
            self.log.append(Entry(now - self.started, feature, 200, used))

    def input_tokens(self, messages: Sequence[dict[str, Any]]) -> int:
        return estimate_tokens(chars_per_token=self.chars_per_token, messages=messages)

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self.log)


class FakeProvider(LocalServer):
    """`Account` behind HTTP: POST /v1/chat/completions. Use as a context manager."""

    def __init__(self, account: Account, latency: Latency | None = None) -> None:
        self.account = account
        self.latency = latency or Latency()
        super().__init__(_handler(self))

    @property
    def url(self) -> str:
        return f"{self.origin}/v1"

    def complete(self, request: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, body, headers) for one request."""
        feature = str(request.get("user") or "unknown")
        input_tokens = self.account.input_tokens(request.get("messages") or [])
        cap = int(request.get("max_completion_tokens") or request.get("max_tokens") or 4096)
        wait = self.account.admit(feature, input_tokens + cap)
        if wait:
            return 429, _rate_limit_error(), _retry_headers(wait)
        said = min(int(request.get("reply_tokens") or cap), cap)
        time.sleep(self.latency.seconds(said))
        self.account.finish(feature, unused=cap - said, used=input_tokens + said)
        truncated = said < int(request.get("reply_tokens") or 0)
        return 200, _completion(request, input_tokens, said, truncated), {}


def _retry_headers(wait: float) -> dict[str, str]:
    return {"retry-after-ms": str(math.ceil(wait * 1000)), "retry-after": str(math.ceil(wait))}


def _rate_limit_error() -> dict[str, Any]:
    message = "Rate limit reached for tokens per min (TPM) or requests per min (RPM)."
    return {"error": {"message": message, "type": "tokens", "code": "rate_limit_exceeded"}}


def _completion(
    request: dict[str, Any], input_tokens: int, output_tokens: int, truncated: bool
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-sim",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "tok " * output_tokens},
                "finish_reason": "length" if truncated else "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": input_tokens,
            "completion_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        },
    }


def _handler(provider: FakeProvider) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects

        def log_message(self, format: str, *args: Any) -> None:
            pass  # thousands of 429s would drown the simulator's output

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            request = json.loads(self.rfile.read(length) or b"{}")
            if self.path != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}}, {})
                return
            self._send(*provider.complete(request))

        def _send(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

    return Handler
