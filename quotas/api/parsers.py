"""The API's JSON parser."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import IO, Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError
from rest_framework.utils import json

from quotas.api.serializers import MAX_DEPTH, shown
from quotas.errors import invalid

# A JSON string, or a bracket or colon outside strings
TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}:]')


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, decoding the body at once rather than through a stream reader (a
    third of the time). DRF hands a JSON parser the body it has read whole, as Django's
    `request.body` (which DATA_UPLOAD_MAX_MEMORY_SIZE bounds)."""

    def parse(
        self,
        stream: IO[Any],
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        # DRF's choice of charset, which refuses codecs that are not text (bz2_codec); newer
        # than the type stubs
        encoding = parsers.get_encoding(parser_context or {})  # type: ignore[attr-defined]
        try:
            text = stream.read().decode(encoding)
            return json.loads(text, parse_constant=json.strict_constant if self.strict else None)
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from exc
        except RecursionError as exc:  # nested about a thousand levels: past the parser's stack
            name = too_deep(text)
            raise invalid({name: "Arrays and objects are nested far too deeply."}) from exc


def too_deep(text: str) -> str:
    """The top-level field of a JSON object whose value nests arrays and objects past
    MAX_DEPTH levels ("non_field_errors" when it is not that), found without recursion."""
    depth, string, key = 0, "", "non_field_errors"
    for token in TOKENS.finditer(text):
        found = token.group()
        if found in "[{":
            depth += 1
            if depth > MAX_DEPTH + 1:
                return key
        elif found in "]}":
            depth -= 1
        elif found == ":" and depth == 1:
            key = shown(json.loads(string))
        else:
            string = found
    return "non_field_errors"
