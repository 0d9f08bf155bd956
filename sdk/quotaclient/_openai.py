"""OpenAI Chat Completions: what a call asks for, and what its answer (or stream) used.

Read through attributes or keys alike, so the openai package is never imported here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._calls import Plan, Report
from ._messages import tools_message

MAX_PARAMS = ("max_completion_tokens", "max_tokens")


def field(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def plan(kwargs: Mapping[str, Any], default_max: int | None, assumed: int = 0) -> Plan:
    """`default_max` is sent as the cap of a call that names none; without it such a call
    reserves `assumed` output tokens per choice and is sent uncapped."""
    choices = count(kwargs.get("n")) or 1
    param, per_choice, capped = "max_completion_tokens", default_max, True
    for name in MAX_PARAMS:
        if count(kwargs.get(name)) is not None:
            param, per_choice = name, kwargs[name]
            break
    if per_choice is None:
        per_choice, capped = assumed, False
    messages = list(kwargs.get("messages") or ())
    tools = tools_message(kwargs.get("tools"))
    return Plan(
        model=str(kwargs.get("model", "")),
        messages=messages + ([tools] if tools else []),
        max_output_tokens=per_choice * choices,
        max_param=param,
        choices=choices,
        streaming=kwargs.get("stream") is True,
        capped=capped,
    )


def caller_wants_usage_chunk(kwargs: Mapping[str, Any]) -> bool:
    return bool(field(kwargs.get("stream_options") or {}, "include_usage"))


def prepare(kwargs: Mapping[str, Any], call: Plan, granted: int) -> dict[str, Any]:
    """The call's arguments with the output cap the reservation granted (per choice), and a
    stream asked to end with its usage."""
    prepared = dict(kwargs)
    if call.capped or granted < call.max_output_tokens:  # an uncapped call is capped by a
        prepared[call.max_param] = max(1, granted // call.choices)  # partial grant only
    if call.streaming and not caller_wants_usage_chunk(kwargs):
        options = dict(kwargs.get("stream_options") or {})
        prepared["stream_options"] = {**options, "include_usage": True}
    return prepared


def finish_reason_of(choices: Any) -> str:
    """A call is truncated if any of its choices is."""
    reasons = [str(field(c, "finish_reason")) for c in choices or () if field(c, "finish_reason")]
    if "length" in reasons:
        return "length"
    return reasons[0] if reasons else ""


def read_usage(report: Report, usage: Any) -> None:
    report.input_tokens = count(field(usage, "prompt_tokens"))
    report.output_tokens = count(field(usage, "completion_tokens"))
    cached = count(field(field(usage, "prompt_tokens_details") or {}, "cached_tokens"))
    report.cached_input_tokens = cached or 0


def report(response: Any) -> Report:
    result = Report(finish_reason=finish_reason_of(field(response, "choices")), complete=True)
    usage = field(response, "usage")
    if usage is not None:
        read_usage(result, usage)
    return result


class StreamTracker:
    """Chunks carry finish reasons per choice; with `include_usage`, a last chunk without
    choices carries the usage. That chunk is hidden from a caller who did not ask for it,
    since code written for the stream it asked for may read `chunk.choices[0]`."""

    def __init__(self, hide_usage_chunk: bool) -> None:
        self._hide_usage_chunk = hide_usage_chunk
        self._report = Report()
        self._reasons: list[Any] = []

    def observe(self, chunk: Any) -> bool:
        choices = field(chunk, "choices") or []
        self._reasons.extend(c for c in choices if field(c, "finish_reason"))
        usage = field(chunk, "usage")
        if usage is None:
            return True
        read_usage(self._report, usage)
        self._report.complete = True
        return not (self._hide_usage_chunk and not choices)

    def report(self) -> Report:
        self._report.finish_reason = finish_reason_of(self._reasons)
        return self._report


def tracker(kwargs: Mapping[str, Any]) -> StreamTracker:
    return StreamTracker(hide_usage_chunk=not caller_wants_usage_chunk(kwargs))
