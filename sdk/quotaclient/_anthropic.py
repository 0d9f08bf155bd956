"""Anthropic Messages: what a call asks for, and what its answer (or stream) used.

Anthropic counts cache reads and cache writes apart from `input_tokens`; the quota server
counts cached tokens as part of the input, so they are added back in."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._calls import Plan, Report
from ._messages import system_message, text_of, tools_message
from ._openai import count, field

# Anthropic's stop reasons in the words the ledger uses for every provider.
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}


def plan(kwargs: Mapping[str, Any], default_max: int | None, assumed: int = 0) -> Plan:
    """As `_openai.plan`. Anthropic requires max_tokens: a call without it (and no
    `default_max`) reserves `assumed`, is sent as it was, and fails as it would unwrapped."""
    max_tokens, capped = count(kwargs.get("max_tokens")), True
    if max_tokens is None:
        max_tokens = default_max
    if max_tokens is None:
        max_tokens, capped = assumed, False
    messages: list[Any] = []
    if kwargs.get("system"):
        messages.append(system_message(text_of(kwargs["system"])))
    messages.extend(kwargs.get("messages") or ())
    tools = tools_message(kwargs.get("tools"))
    if tools:
        messages.append(tools)
    return Plan(
        model=str(kwargs.get("model", "")),
        messages=messages,
        max_output_tokens=max_tokens,
        max_param="max_tokens",
        streaming=kwargs.get("stream") is True,
        capped=capped,
    )


def prepare(kwargs: Mapping[str, Any], call: Plan, granted: int) -> dict[str, Any]:
    if not call.capped and granted >= call.max_output_tokens:
        return dict(kwargs)
    return {**kwargs, "max_tokens": max(1, granted)}


def finish_reason(stop_reason: Any) -> str:
    return FINISH_REASONS.get(str(stop_reason), str(stop_reason)) if stop_reason else ""


def read_usage(report: Report, usage: Any) -> None:
    """Reads the counts a usage object has; a stream's message_delta repeats only some."""
    fresh = count(field(usage, "input_tokens"))
    read = count(field(usage, "cache_read_input_tokens"))
    written = count(field(usage, "cache_creation_input_tokens"))
    if fresh is not None:
        report.input_tokens = fresh + (read or 0) + (written or 0)
        report.cached_input_tokens = read or 0
    output = count(field(usage, "output_tokens"))
    if output is not None:
        report.output_tokens = output


def report(message: Any, *, complete: bool = True) -> Report:
    result = Report(finish_reason=finish_reason(field(message, "stop_reason")), complete=complete)
    usage = field(message, "usage")
    if usage is not None:
        read_usage(result, usage)
    return result


def snapshot_report(stream: Any) -> Report:
    """The usage of a `messages.stream()` helper, from the message it accumulated. It is
    complete once the stop reason arrived (in message_delta); a stream left before its
    message_start reported nothing, and is charged as reserved."""
    try:
        message = stream.current_message_snapshot
    except AssertionError:
        message = None
    if message is None:
        return Report()
    return report(message, complete=field(message, "stop_reason") is not None)


class StreamTracker:
    """message_start carries the input usage; message_delta the stop reason and the final,
    cumulative output tokens."""

    def __init__(self) -> None:
        self._report = Report()

    def observe(self, event: Any) -> bool:
        kind = field(event, "type")
        if kind == "message_start":
            read_usage(self._report, field(field(event, "message"), "usage"))
        elif kind == "message_delta":
            read_usage(self._report, field(event, "usage"))
            stop = field(field(event, "delta"), "stop_reason")
            if stop:
                self._report.finish_reason = finish_reason(stop)
                self._report.complete = True
        return True

    def report(self) -> Report:
        return self._report
