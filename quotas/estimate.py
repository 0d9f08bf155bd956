"""Offline input-token estimate for callers that send text instead of a count.

No tokenizer is downloaded at run time. Text is counted in characters and divided by the
model's calibrated characters per token (`LanguageModel.chars_per_token`), plus the framing
that chat formats add per message. The estimate leans high: a reservation is a worst case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

TOKENS_PER_MESSAGE = 4  # role and separators around each chat message
TOKENS_PER_REPLY = 3  # the primer of the assistant's reply
SAFETY = 1.1


def _text_of(content: Any) -> str:
    """Chat content is a string or a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            _text_of(part.get("text", "")) for part in content if isinstance(part, dict)
        )
    return ""


def estimate_tokens(
    *,
    chars_per_token: float,
    prompt: str | None = None,
    messages: Sequence[dict[str, Any]] | None = None,
) -> int:
    if prompt is not None:
        return math.ceil(len(prompt) / chars_per_token * SAFETY)
    total = TOKENS_PER_REPLY
    for message in messages or ():
        text = _text_of(message.get("content")) + str(message.get("name", ""))
        total += TOKENS_PER_MESSAGE + math.ceil(len(text) / chars_per_token * SAFETY)
    return total
