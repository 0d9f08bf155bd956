"""Request bodies sent chunked (`Transfer-Encoding: chunked`, no `Content-Length`).

Django reads as many bytes of a body as its Content-Length says and takes a request without
one as having none, so it would drop a chunked body unread and act on the request as if it
were empty. gunicorn decodes chunked bodies and says so with `wsgi.input_terminated` (its
input then ends where the body does); such a body is read here, at most one byte past
DATA_UPLOAD_MAX_MEMORY_SIZE so that Django's own limit still refuses a larger one, and handed
on with its length. A server that does not promise that gets a JSON 411.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from typing import Any

from django.conf import settings

from quotas.errors import QuotaError

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class ChunkedBodies:
    """WSGI middleware: gives Django a chunked body with its length, or refuses it."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if chunked and not environ.get("CONTENT_LENGTH"):
            if not environ.get("wsgi.input_terminated"):
                return length_required(start_response)
            limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
            stream = environ["wsgi.input"]
            body = stream.read() if limit is None else stream.read(limit + 1)
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
        return self.app(environ, start_response)


def length_required(start_response: StartResponse) -> list[bytes]:
    refused = QuotaError(
        "length_required",
        "This server cannot read a chunked body: send the body with a Content-Length.",
    )
    body = json.dumps(refused.body()).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    start_response("411 Length Required", headers)
    return [body]
