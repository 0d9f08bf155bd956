"""The admin's front-end libraries come from npm (package-lock.json) and are served as this
project's own static files, so the admin works offline and without a CDN."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.conf import settings as django_settings
from django.contrib.staticfiles import finders
from django.templatetags.static import static
from django.test import Client

CHARTJS = "vendor/chartjs/chart.umd.js"
BASE_DIR = Path(django_settings.BASE_DIR)
PACKAGE = BASE_DIR / "node_modules" / "chart.js" / "package.json"
NOT_INSTALLED = "Chart.js is not installed: run bin/test, or `npm ci --omit=dev` at the top"


def chartjs_version() -> str:
    assert PACKAGE.is_file(), NOT_INSTALLED
    version: str = json.loads(PACKAGE.read_text())["version"]
    return version


def test_chartjs_is_the_pinned_version() -> None:
    pinned = json.loads((BASE_DIR / "package.json").read_text())
    assert pinned["dependencies"]["chart.js"] == chartjs_version()
    assert chartjs_version().startswith("4.")


def test_finder_resolves_chartjs_to_the_real_library() -> None:
    version = chartjs_version()
    found = finders.find(CHARTJS)
    assert found, NOT_INSTALLED
    head = Path(str(found)).read_text(encoding="utf-8")[:500]
    assert f"Chart.js v{version}" in head
    assert static(CHARTJS) == f"/static/{CHARTJS}"


def test_served_at_its_static_url_without_collectstatic(settings: Any) -> None:
    """Under DEBUG whitenoise serves it from the finders (WHITENOISE_USE_FINDERS follows DEBUG);
    in production `bin/run` collects it into STATIC_ROOT first, and whitenoise serves that."""
    settings.DEBUG = True
    response = Client().get(f"/static/{CHARTJS}")
    assert response.status_code == 200
    assert "javascript" in response["Content-Type"]
    body = b"".join(response.streaming_content)  # type: ignore[attr-defined]
    assert f"Chart.js v{chartjs_version()}".encode() in body[:500]
