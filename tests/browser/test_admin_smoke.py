"""The admin in a real browser: superuser and tenant owner log in through the login form, an
owner sees only their own tenant's features, and Chart.js is served from the static files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from tests.factories import FeatureFactory, TenantFactory

pytestmark = pytest.mark.django_db(transaction=True)

CHARTJS_URL = "/static/vendor/chartjs/chart.umd.js"


@pytest.fixture
def tenants(make_user: Callable[..., Any]) -> dict[str, Any]:
    acme, bravo = TenantFactory(slug="acme"), TenantFactory(slug="bravo")
    owner = make_user("ann@acme.example", tenants=[acme])
    other = make_user("bob@bravo.example", tenants=[bravo])
    return {
        "owner": owner,
        "root": make_user("root@example.com", superuser=True),
        "own": FeatureFactory(tenant=acme, slug="chat", owner=owner),
        "foreign": FeatureFactory(tenant=bravo, slug="bravo-secret", owner=other),
    }


def chartjs_version() -> str:
    package = Path(settings.BASE_DIR) / "node_modules" / "chart.js" / "package.json"
    version: str = json.loads(package.read_text())["version"]
    return version


def test_superuser_sees_every_tenants_features(
    page: Any, tenants: dict[str, Any], login: Any, shot: Any, js_errors: list[str]
) -> None:
    login(page, tenants["root"])
    shot(page, "index")
    page.goto("/admin/tenants/feature/")
    shot(page, "features")
    rows = page.locator("#result_list tbody tr")
    assert sorted(rows.locator("th a").all_inner_texts()) == ["acme/chat", "bravo/bravo-secret"]
    assert js_errors == []


def test_owner_sees_only_their_own_feature(
    page: Any, tenants: dict[str, Any], login: Any, shot: Any, js_errors: list[str]
) -> None:
    login(page, tenants["owner"])
    shot(page, "index")
    page.goto("/admin/tenants/feature/")
    shot(page, "features")
    assert page.locator("#result_list tbody tr th a").all_inner_texts() == ["acme/chat"]
    assert "bravo-secret" not in page.content()

    page.get_by_role("link", name="acme/chat").click()
    page.wait_for_url(f"**/admin/tenants/feature/{tenants['own'].pk}/change/")
    shot(page, "own feature")
    assert page.locator("#feature_form").is_visible()

    # Another tenant's feature by its URL: the admin answers as for a row that does not exist.
    response = page.goto(f"/admin/tenants/feature/{tenants['foreign'].pk}/change/")
    shot(page, "foreign feature")
    assert response is not None
    assert response.status == 404 or page.url.endswith("/admin/"), (response.status, page.url)
    assert page.locator("#feature_form").count() == 0
    assert "bravo-secret" not in page.content()
    assert js_errors == []


def test_chartjs_is_served_from_static_and_runs(
    page: Any, tenants: dict[str, Any], login: Any, shot: Any
) -> None:
    version = chartjs_version()
    response = page.request.get(CHARTJS_URL)
    assert response.status == 200
    assert f"Chart.js v{version}" in response.text()[:500]

    # The same file, loaded into an admin page, draws a chart.
    login(page, tenants["owner"])
    page.add_script_tag(url=CHARTJS_URL)
    drawn = page.evaluate(
        """() => {
            const canvas = document.createElement("canvas");
            canvas.width = 400; canvas.height = 200;
            document.querySelector("#content").prepend(canvas);
            const chart = new Chart(canvas, {
                type: "bar",
                data: {labels: ["chat", "batch"], datasets: [{label: "tokens", data: [3, 5]}]},
                options: {animation: false},
            });
            return {version: Chart.version, bars: chart.getDatasetMeta(0).data.length};
        }"""
    )
    shot(page, "chart")
    assert drawn == {"version": version, "bars": 2}
