"""The API's JSON parser."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import IO, Any

from rest_framework import parsers


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, given the body as Django's `request.body` reads it. DRF hands a
    parser the raw stream, which skips Django's DATA_UPLOAD_MAX_MEMORY_SIZE check, and a
    prompt may travel in the body: a larger one raises RequestDataTooBig (a 400 saying so)."""

    def parse(
        self,
        stream: IO[Any],
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        assert parser_context is not None  # DRF's Request always gives one, with itself
        body = parser_context["request"].body
        return super().parse(io.BytesIO(body), media_type, parser_context)
