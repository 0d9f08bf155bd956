"""Fake OpenAI and Anthropic servers on 127.0.0.1: they speak the providers' response shapes
(JSON and server-sent events) so the real `openai` and `anthropic` packages can be pointed
at them with `base_url`. The "model" says `reply_tokens` words, cut at the call's max_tokens
(and then says so: finish_reason length / stop_reason max_tokens), and reports the usage it
is told to, so tests can tell a provider's usage from the quota server's estimate."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from sim.local_server import LocalServer


@dataclass
class Script:
    """What the fake model does with the next calls."""

    reply_tokens: int = 20
    input_tokens: int = 42
    cached_input_tokens: int = 0
    token_delay: float = 0.0  # seconds between streamed tokens
    fail_status: int | None = None
    fail_times: int | None = None  # how many calls fail with fail_status (None: every one)
    headers: dict[str, str] = field(default_factory=dict)  # sent with every answer


@dataclass
class Answer:
    words: list[str]
    truncated: bool

    @property
    def text(self) -> str:
        return " ".join(self.words)


class FakeProvider(LocalServer):
    """Base of the fakes: an HTTP server in a thread, recording every JSON body it got."""

    path = ""

    def __init__(self) -> None:
        self.script = Script()
        self.requests: list[dict[str, Any]] = []
        super().__init__(self._handler())

    @property
    def url(self) -> str:
        return self.origin

    def answer(self, max_tokens: int) -> Answer:
        said = min(self.script.reply_tokens, max_tokens)
        words = [f"w{i}" for i in range(said)]
        return Answer(words, truncated=said < self.script.reply_tokens)

    # -- what subclasses say --

    def json_body(self, request: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def events(self, request: dict[str, Any]) -> Iterator[tuple[str | None, dict[str, Any] | str]]:
        raise NotImplementedError

    def error_body(self, status: int) -> dict[str, Any]:
        raise NotImplementedError

    # -- HTTP --

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet tests

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = json.loads(self.rfile.read(length) or b"{}")
                fake.requests.append(request)
                if self.path != fake.path:
                    self._json(404, {"error": {"message": f"no route {self.path}"}})
                elif fake.failing():
                    self._json(fake.script.fail_status, fake.error_body(fake.script.fail_status))
                elif request.get("stream"):
                    self._stream(fake.events(request))
                else:
                    self._json(200, fake.json_body(request))

            def _json(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in fake.script.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, events: Iterator[tuple[str | None, dict[str, Any] | str]]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                for name, value in fake.script.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                for name, data in events:
                    payload = data if isinstance(data, str) else json.dumps(data)
                    prefix = f"event: {name}\n" if name else ""
                    self.wfile.write(f"{prefix}data: {payload}\n\n".encode())
                    self.wfile.flush()
                self.close_connection = True

        return Handler

    def failing(self) -> bool:
        """Whether this call fails (the script's status, for its number of calls)."""
        script = self.script
        if script.fail_status is None or script.fail_times == 0:
            return False
        if script.fail_times is not None:
            script.fail_times -= 1
        return True

    def pause(self) -> None:
        if self.script.token_delay:
            time.sleep(self.script.token_delay)


class FakeOpenAI(FakeProvider):
    """POST /v1/chat/completions, plain and streaming (usage in a last chunk without choices
    when stream_options.include_usage is set, as OpenAI does)."""

    path = "/v1/chat/completions"

    def _max_tokens(self, request: dict[str, Any]) -> int:
        cap = request.get("max_completion_tokens") or request.get("max_tokens")
        return int(cap) if cap else 10_000

    def _usage(self, output_tokens: int) -> dict[str, Any]:
        return {
            "prompt_tokens": self.script.input_tokens,
            "completion_tokens": output_tokens,
            "total_tokens": self.script.input_tokens + output_tokens,
            "prompt_tokens_details": {"cached_tokens": self.script.cached_input_tokens},
        }

    def json_body(self, request: dict[str, Any]) -> dict[str, Any]:
        answer = self.answer(self._max_tokens(request))
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": request.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.text},
                    "finish_reason": "length" if answer.truncated else "stop",
                    "logprobs": None,
                }
            ],
            "usage": self._usage(len(answer.words)),
        }

    def events(self, request: dict[str, Any]) -> Iterator[tuple[str | None, dict[str, Any] | str]]:
        answer = self.answer(self._max_tokens(request))
        with_usage = bool((request.get("stream_options") or {}).get("include_usage"))

        def chunk(choices: list[dict[str, Any]], usage: Any = None) -> dict[str, Any]:
            body = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": request.get("model"),
                "choices": choices,
            }
            if with_usage:
                body["usage"] = usage
            return body

        for word in answer.words:
            self.pause()
            yield (
                None,
                chunk([{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]),
            )
        finish = "length" if answer.truncated else "stop"
        yield None, chunk([{"index": 0, "delta": {}, "finish_reason": finish}])
        if with_usage:
            yield None, chunk([], self._usage(len(answer.words)))
        yield None, "[DONE]"

    def error_body(self, status: int) -> dict[str, Any]:
        return {"error": {"message": "fake failure", "type": "fake", "code": str(status)}}


class FakeAnthropic(FakeProvider):
    """POST /v1/messages, plain and streaming (message_start carries the input usage,
    message_delta the stop reason and the output tokens)."""

    path = "/v1/messages"

    def _usage(self, output_tokens: int) -> dict[str, Any]:
        cached = self.script.cached_input_tokens
        return {
            "input_tokens": self.script.input_tokens - cached,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
            "output_tokens": output_tokens,
        }

    def json_body(self, request: dict[str, Any]) -> dict[str, Any]:
        answer = self.answer(int(request["max_tokens"]))
        return {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": request.get("model"),
            "content": [{"type": "text", "text": answer.text}],
            "stop_reason": "max_tokens" if answer.truncated else "end_turn",
            "stop_sequence": None,
            "usage": self._usage(len(answer.words)),
        }

    def events(self, request: dict[str, Any]) -> Iterator[tuple[str | None, dict[str, Any] | str]]:
        answer = self.answer(int(request["max_tokens"]))
        message = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": request.get("model"),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self._usage(1),
        }
        yield "message_start", {"type": "message_start", "message": message}
        block = {"type": "text", "text": ""}
        yield (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        )
        for word in answer.words:
            self.pause()
            delta = {"type": "text_delta", "text": word + " "}
            yield "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
        yield "content_block_stop", {"type": "content_block_stop", "index": 0}
        stop = "max_tokens" if answer.truncated else "end_turn"
        yield (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": len(answer.words)},
            },
        )
        yield "message_stop", {"type": "message_stop"}

    def error_body(self, status: int) -> dict[str, Any]:
        return {"type": "error", "error": {"type": "rate_limit_error", "message": "fake failure"}}
