"""The API's content negotiation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import BaseParser
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request

T = TypeVar("T")


class OneRendererNegotiation(DefaultContentNegotiation):
    """DRF's negotiation, with its answer to the usual API call taken as known. With one
    renderer, no format asked for and an Accept header that is absent, `*/*` or the renderer's
    own media type, DRF picks that renderer and media type; with one parser and a Content-Type
    that is exactly its media type, that parser. DRF finds them by parsing the headers into
    media types, on every call. Any other request is negotiated by DRF."""

    def select_parser(self, request: Request, parsers: Iterable[BaseParser]) -> BaseParser | None:
        parser = _only(parsers)
        if parser is not None and request.content_type == parser.media_type:
            return parser
        return super().select_parser(request, parsers)

    def select_renderer(
        self, request: Request, renderers: Iterable[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        renderer = _only(renderers)
        if (
            renderer is not None
            and not format_suffix
            and request.META.get("HTTP_ACCEPT", "*/*") in ("*/*", renderer.media_type)
            and not _format_asked(request, self.settings.URL_FORMAT_OVERRIDE)
        ):
            return renderer, renderer.media_type
        return super().select_renderer(request, renderers, format_suffix)


def _format_asked(request: Request, param: str | None) -> bool:
    """Whether the query string names a format (read only when there is one: parsing even an
    empty query string costs a QueryDict)."""
    return bool(request.META.get("QUERY_STRING")) and param in request.query_params


def _only(items: Iterable[T]) -> T | None:
    """The item of a list of one (DRF passes its parsers and renderers as lists), else None."""
    return items[0] if isinstance(items, Sequence) and len(items) == 1 else None
