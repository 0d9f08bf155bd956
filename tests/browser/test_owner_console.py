"""An owner's day in a real browser: reservations made through the API show on the feature's
page as bars and charts with the right numbers; the owner pauses the feature and its next
reservation is refused with feature_paused; another tenant's owner reaches none of it."""

from __future__ import annotations

import re
from typing import Any

import pytest

from ledger.rollups import rollups_update
from ledger.tasks import ledger_ingest
from quotas.store import get_engine

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def people(world: Any, make_user: Any) -> dict[str, Any]:
    from tests.factories import FeatureFactory, TenantFactory

    bravo = TenantFactory(slug="bravo")
    other = make_user("bob@bravo.example", tenants=[bravo])
    FeatureFactory(tenant=bravo, slug="bravo-report", owner=other)
    return {"owner": make_user("ann@acme.example", tenants=[world.tenant]), "other": other}


def cell_text(page: Any, limit_id: int, name: str) -> str:
    text: str = page.locator(f'tr[data-limit-id="{limit_id}"] .console-{name}').inner_text()
    return text.strip()


def test_an_owner_sees_live_usage_and_pauses_the_feature(
    page: Any,
    world: Any,
    reserve: Any,
    people: dict[str, Any],
    login: Any,
    shot: Any,
    js_errors: list[str],
) -> None:
    engine = get_engine()
    engine.frozen_ms = engine.now_ms()  # buckets do not refill while the page is looked at
    tpm = world.limit(tenant=world.tenant, feature=world.chat, metric="tokens", amount=10_000)
    daily = world.limit(
        tenant=world.tenant, feature=world.chat, metric="requests", window="day", amount=20
    )
    client = world.client()
    for input_tokens in (1_000, 2_000, 500):
        held = reserve(input_tokens=input_tokens, max_output_tokens=400)
        assert held.status_code == 201, held.content
        done = client.post(
            f"/api/v1/reservations/{held.json()['id']}/commit",
            {"input_tokens": input_tokens, "output_tokens": 300, "finish_reason": "length"},
            format="json",
        )
        assert done.status_code == 200, done.content
    open_one = reserve(input_tokens=700, max_output_tokens=300)
    assert open_one.status_code == 201
    assert ledger_ingest() == 7 and rollups_update() >= 1

    login(page, people["owner"])
    shot(page, "dashboard")
    assert page.locator("#closest").get_by_text("acme / chat: 20 requests per day").is_visible()

    page.goto(f"/admin/tenants/feature/{world.chat.pk}/change/")
    page.wait_for_function("window.usageCharts !== undefined")
    shot(page, "feature with live bars and charts")

    # 3,500 input + 900 output committed, 700 + 300 held
    assert cell_text(page, tpm.pk, "used") == "5,400"
    assert cell_text(page, tpm.pk, "remaining") == "4,600"
    assert cell_text(page, daily.pk, "used") == "4"
    bar = page.locator(f'tr[data-limit-id="{tpm.pk}"] [role="meter"]')
    assert bar.get_attribute("aria-valuenow") == "54.0"
    assert page.locator(".console-held-count").inner_text() == "1"
    assert open_one.json()["id"] in page.locator("#held").inner_text()
    day = page.locator('tr[data-period="Last 24 hours"]')
    assert day.locator('[data-field="input_tokens"]').inner_text() == "3,500"
    assert day.locator('[data-field="truncated"]').inner_text() == "3"
    hourly = page.evaluate(
        "() => window.usageCharts.hourly.data.datasets.map(d => d.data.reduce((a, b) => a + b))"
    )
    assert hourly == [3_500, 900, 0, 3, 0]  # input, output, refusals, truncations, 429s
    assert page.evaluate("() => window.usageCharts.daily.data.labels.length") == 30

    page.locator("#feature-pause").click()
    shot(page, "confirm pause")
    page.get_by_role("button", name="Yes, pause it").click()
    page.wait_for_selector("#feature-resume")
    shot(page, "paused")
    assert page.locator("#feature-status").inner_text() == "paused"
    assert "Paused acme/chat" in page.locator(".messagelist").inner_text()
    refused = reserve()
    assert refused.status_code == 423 and refused.json()["error"] == "feature_paused"

    page.goto(f"/admin/tenants/feature/{world.chat.pk}/history/")
    shot(page, "history")
    assert "Paused the feature." in page.content()
    assert js_errors == []


def test_another_tenants_owner_reaches_none_of_it(
    page: Any, world: Any, reserve: Any, people: dict[str, Any], login: Any, shot: Any
) -> None:
    world.limit(tenant=world.tenant, feature=world.chat, metric="tokens", amount=10_000)
    assert reserve().status_code == 201

    login(page, people["other"])
    shot(page, "dashboard")
    assert "acme" not in page.locator("#content").inner_text()

    response = page.goto(f"/admin/tenants/feature/{world.chat.pk}/change/")
    shot(page, "foreign feature")
    assert response is not None
    assert page.locator("#live").count() == 0 and page.locator("#feature-pause").count() == 0
    assert not re.search(r"acme/chat|console-held-count", page.content())

    page.goto("/admin/")
    token = page.locator("input[name=csrfmiddlewaretoken]")
    csrf = token.first.get_attribute("value") if token.count() else ""
    forged = page.request.post(
        f"/admin/tenants/feature/{world.chat.pk}/status/",
        form={"status": "paused", "csrfmiddlewaretoken": csrf or ""},
        headers={"Referer": page.url},
    )
    assert forged.status == 404
    world.chat.refresh_from_db()
    assert world.chat.status == "active"
