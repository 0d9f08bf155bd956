"""Chat messages reduced to what the server's input-token estimate reads: a role and text.

The server estimates input tokens from the characters of each message. Sending it images,
audio or whole tool objects would only make the request heavier, so every message becomes
`{"role", "content": text}`, where text gathers the text parts, tool calls and tool results
of the message (those are tokens the provider bills too)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

# Parts that carry no text the provider bills as text (their own cost is not estimated).
_OPAQUE_PARTS = {"image", "image_url", "input_image", "input_audio", "audio", "file", "document"}


def text_of(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return _text_of_part(value)
    if isinstance(value, Iterable):
        return " ".join(filter(None, (text_of(item) for item in value)))
    return ""


def _text_of_part(part: Mapping[str, Any]) -> str:
    if part.get("type") in _OPAQUE_PARTS:
        return ""
    if isinstance(part.get("text"), str):
        return str(part["text"])
    if "content" in part:  # a tool result
        return text_of(part["content"])
    if "input" in part:  # a tool call (Anthropic)
        return json.dumps(part["input"], default=str)
    if "function" in part:  # a tool call (OpenAI)
        return json.dumps(part["function"], default=str)
    return ""


def as_mapping(message: Any) -> Mapping[str, Any]:
    """Messages are dicts, but SDK users sometimes pass the SDKs' own pydantic objects."""
    if isinstance(message, Mapping):
        return message
    dump = getattr(message, "model_dump", None)
    if callable(dump):
        return dict(dump())
    return {"role": "user", "content": str(message)}


def for_estimate(messages: Iterable[Any]) -> list[dict[str, str]]:
    reduced = []
    for raw in messages:
        message = as_mapping(raw)
        parts = [text_of(message.get("content"))]
        if message.get("tool_calls"):
            parts.append(text_of(message["tool_calls"]))
        if isinstance(message.get("name"), str):
            parts.append(message["name"])
        text = " ".join(filter(None, parts))
        reduced.append({"role": str(message.get("role", "user")), "content": text})
    return reduced


def system_message(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def tools_message(tools: Any) -> dict[str, str] | None:
    """Tool definitions are part of the prompt the provider bills."""
    if not tools:
        return None
    return system_message(json.dumps([as_mapping(tool) for tool in tools], default=str))
