"""The API's documentation page in a real browser: it renders the operations from the schema
and nothing it loads comes from another site (no CDN, no web fonts)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.django_db(transaction=True)

REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


def test_the_api_docs_render_from_the_project_s_own_files(
    page: Any, live_server: Any, js_errors: list[str], shot: Callable[[Any, str], Path]
) -> None:
    sent: list[str] = []  # requests that went out: answered, or failed on the network
    page.on("requestfinished", lambda request: sent.append(request.url))
    # the page's Content-Security-Policy stops Redoc's CDN logo in the browser: never sent
    page.on("requestfailed", lambda r: r.failure == "csp" or sent.append(r.url))

    page.goto("/api/docs/")
    page.get_by_role("heading", name="reservation_commit").wait_for()  # the operation ids
    page.wait_for_load_state("networkidle")
    shot(page, "api-docs")

    ours = urlsplit(live_server.url).netloc
    assert [url for url in sent if urlsplit(url).netloc not in (ours, "")] == []
    assert any(url.endswith("/api/schema/") for url in sent)
    assert any("/static/drf_spectacular_sidecar/redoc/" in url for url in sent)
    # the browser reports the logo it refused, and nothing else
    assert [e for e in js_errors if REDOC_LOGO not in e] == []
