"""The owner console in the admin: live bars read from the engine, held reservations, usage
from the rollups, the dashboard, and the actions (pause / resume, boost, revoke), each audited
and each refused to another tenant's owner."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.test import Client
from django.urls import reverse
from django.utils import timezone

import console.panels
import quotas.usage
from alerts.models import Alert, Delivery, Notification
from console.tasks import refresh_platform_snapshot
from ledger.models import UsageRollup
from quotas.boosts import limit_boost
from quotas.engine import Engine
from quotas.models import ApiKey
from quotas.plan import plans
from quotas.plan.load import plan_load
from quotas.store import get_engine, redis_client
from tests.factories import FeatureFactory, TenantFactory, TenantOwnerFactory, UserFactory
from tests.fixtures import DEAD_STORE


@pytest.fixture(autouse=True)
def midday() -> None:
    """The engine's clock stands still at noon, far from the tenant's midnight, when the day
    budgets of these tests would start again."""
    engine = get_engine()
    now = datetime.fromtimestamp(engine.now_ms() / 1000, tz=UTC)
    engine.frozen_ms = int(now.replace(hour=12, minute=0).timestamp() * 1000)


@pytest.fixture
def owners(world: Any) -> Any:
    """The owner of acme (the world's tenant), another tenant's owner, and a superuser."""
    owner = TenantOwnerFactory(username="olga@acme.example")
    world.tenant.owners.add(owner)
    other = TenantOwnerFactory(username="bert@bravo.example")
    bravo = TenantFactory(slug="bravo")
    bravo.owners.add(other)
    FeatureFactory(tenant=bravo, slug="bravo-chat")
    root = UserFactory(username="root@example.com", is_superuser=True)
    return type("Owners", (), {"owner": owner, "other": other, "root": root, "bravo": bravo})


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def feature_url(feature: Any, action: str = "change") -> str:
    return reverse(f"admin:tenants_feature_{action}", args=[feature.pk])


def limit_row(html: str, limit_id: int) -> str:
    match = re.search(rf'<tr data-limit-id="{limit_id}">(.*?)</tr>', html, re.S)
    assert match, f"no row for limit {limit_id}"
    return match.group(1)


def cell(row: str, name: str) -> str:
    match = re.search(rf'class="console-num console-{name}">([^<]*)<', row)
    assert match, f"no {name} cell"
    return match.group(1)


# -- live state ---------------------------------------------------------------------------


def test_a_feature_page_shows_each_limit_as_the_engine_counts_it(
    world: Any, reserve: Any, owners: Any
) -> None:
    tpm = world.limit(tenant=world.tenant, feature=world.chat, metric="tokens", amount=10_000)
    day = world.limit(
        tenant=world.tenant, feature=world.chat, metric="requests", window="day", amount=50
    )
    held = reserve(input_tokens=1_000, max_output_tokens=500)
    done = reserve(input_tokens=2_000, max_output_tokens=1_000)
    assert held.status_code == done.status_code == 201
    world.client().post(
        f"/api/v1/reservations/{done.json()['id']}/commit",
        {"input_tokens": 2_000, "output_tokens": 200},
        format="json",
    )

    page = logged_in(owners.owner).get(feature_url(world.chat))

    assert page.status_code == 200
    html = page.content.decode()
    tokens = limit_row(html, tpm.pk)
    # held 1,500 + committed 2,200
    assert (cell(tokens, "used"), cell(tokens, "remaining")) == ("3,700", "6,300")
    assert cell(tokens, "cap") == "10,000"
    requests = limit_row(html, day.pk)
    assert (cell(requests, "used"), cell(requests, "remaining")) == ("2", "48")
    assert 'class="console-bar ok"' in requests and 'aria-valuenow="4.0"' in requests
    assert re.search(r'class="console-held-count">1<', html)
    assert held.json()["id"] in html and done.json()["id"] not in html


def test_a_feature_page_shows_the_callers_in_line_and_their_promised_wait(
    world: Any, reserve: Any, owners: Any
) -> None:
    tpm = world.limit(tenant=world.tenant, feature=world.chat, metric="tokens", amount=60_000)
    assert reserve(input_tokens=59_000, max_output_tokens=1_000).status_code == 201
    waiting = reserve(input_tokens=4_000, max_output_tokens=1_000, max_wait_ms=60_000)
    assert waiting.json()["status"] == "scheduled"
    get_engine().frozen_ms += 2_000  # two of its five seconds in line have passed

    html = logged_in(owners.owner).get(feature_url(world.chat)).content.decode()

    assert re.search(r'class="console-held-waiting">1 in line<', html)
    row = re.search(rf"{waiting.json()['id']}.*?</tr>", html, re.S)
    assert row and "starts in 3" in row.group(0) and "promised 5" in row.group(0)
    # the line's 5,000 tokens count as used, less the 2,000 refilled since
    assert cell(limit_row(html, tpm.pk), "used") == "63,000"


def test_a_bar_turns_red_when_a_limit_is_nearly_used_up(
    world: Any, reserve: Any, owners: Any
) -> None:
    day = world.limit(
        tenant=world.tenant, feature=world.chat, metric="requests", window="day", amount=10
    )
    for _ in range(9):
        assert reserve().status_code == 201

    html = logged_in(owners.owner).get(feature_url(world.chat)).content.decode()

    assert 'class="console-bar full"' in limit_row(html, day.pk)


def test_the_usage_panel_sums_the_rollups_of_the_last_24_hours_and_30_days(
    world: Any, owners: Any
) -> None:
    now = timezone.now()
    hour = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    rows = [
        ("hour", hour, 10, 1_000, 200, 3, 1),
        ("hour", hour - timedelta(hours=23), 5, 500, 100, 0, 2),
        ("hour", hour - timedelta(hours=24), 99, 99_000, 9_900, 9, 9),  # outside 24 h
        ("day", hour.replace(hour=0), 15, 1_500, 300, 3, 3),
        ("day", hour.replace(hour=0) - timedelta(days=29), 7, 700, 70, 1, 0),
        ("day", hour.replace(hour=0) - timedelta(days=30), 50, 5, 5, 5, 5),  # outside 30 days
    ]
    for grain, start, requests, tokens_in, tokens_out, rate_limited, truncated in rows:
        UsageRollup.objects.create(
            grain=grain,
            start=start,
            tenant="acme",
            feature="chat",
            pool="shared",
            model=world.model.name,
            requests=requests,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cost_nusd=tokens_in * 150,
            refused_rate_limited=rate_limited,
            truncated=truncated,
            upstream_429=1,
        )
    UsageRollup.objects.create(  # another feature's usage is not this one's
        grain="hour", start=hour, tenant="acme", feature="batch", requests=1_000
    )

    html = logged_in(owners.owner).get(feature_url(world.chat)).content.decode()

    day_row = re.search(r'<tr data-period="Last 24 hours">(.*?)</tr>', html, re.S)
    month_row = re.search(r'<tr data-period="Last 30 days">(.*?)</tr>', html, re.S)
    assert day_row and month_row

    def field(row: str, name: str) -> str:
        found = re.search(rf'data-field="{name}">([^<]*)<', row)
        assert found
        return found.group(1)

    assert field(day_row.group(1), "requests") == "15"
    assert field(day_row.group(1), "input_tokens") == "1,500"
    assert field(day_row.group(1), "output_tokens") == "300"
    assert field(day_row.group(1), "rate_limited") == "3"
    assert field(day_row.group(1), "truncated") == "3"
    assert field(day_row.group(1), "upstream_429") == "2"
    assert field(month_row.group(1), "requests") == "22"
    assert field(month_row.group(1), "cost_usd") == "$0.00033"  # 2,200 tokens at $0.15/M
    chart = re.search(r'id="usage-chart-data" type="application/json">(.*?)</script>', html, re.S)
    assert chart and '"input_tokens": [' in chart.group(1)


def test_with_the_store_down_the_page_says_so_and_still_works(
    world: Any, owners: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.limit(tenant=world.tenant, feature=world.chat, metric="tokens", amount=10_000)
    dead = Engine(
        redis_client(DEAD_STORE),
        hash_tag=settings.QUOTA_HASH_TAG,
    )
    monkeypatch.setattr(quotas.usage, "get_engine", lambda: dead)
    monkeypatch.setattr(console.panels, "get_engine", lambda: dead)

    page = logged_in(owners.owner).get(feature_url(world.chat))

    assert page.status_code == 200
    assert "The quota store (Redis) is unavailable" in page.content.decode()


def test_tenant_and_pool_pages_show_live_state_within_the_owners_tenants(
    world: Any, reserve: Any, owners: Any
) -> None:
    mine = world.limit(tenant=world.tenant, pool=world.pool, metric="tokens", amount=50_000)
    theirs = world.limit(tenant=owners.bravo, pool=world.pool, metric="tokens", amount=70_000)
    capacity = world.limit(pool=world.pool, metric="tokens", amount=100_000)
    assert reserve(input_tokens=400, max_output_tokens=100).status_code == 201

    tenant_page = logged_in(owners.owner).get(
        reverse("admin:tenants_tenant_change", args=[world.tenant.pk])
    )
    owner_pool = logged_in(owners.owner).get(
        reverse("admin:providers_pool_change", args=[world.pool.pk])
    )
    root_pool = logged_in(owners.root).get(
        reverse("admin:providers_pool_change", args=[world.pool.pk])
    )

    assert cell(limit_row(tenant_page.content.decode(), mine.pk), "used") == "500"
    features = tenant_page.content.decode().split('id="features"')[1].split('id="live"')[0]
    assert feature_url(world.chat) in features and feature_url(world.batch) in features
    html = owner_pool.content.decode()
    assert f'data-limit-id="{mine.pk}"' in html
    assert (
        f'data-limit-id="{theirs.pk}"' not in html and f'data-limit-id="{capacity.pk}"' not in html
    )
    html = root_pool.content.decode()
    assert all(f'data-limit-id="{lim.pk}"' in html for lim in (mine, theirs, capacity))
    assert re.search(r'class="console-held-count">1<', html)


# -- the kill switch ----------------------------------------------------------------------


def test_pausing_a_feature_refuses_its_next_reservation_and_is_audited(
    world: Any, reserve: Any, owners: Any, django_capture_on_commit_callbacks: Any
) -> None:
    assert reserve().status_code == 201  # the plan is cached in this process
    client = logged_in(owners.owner)

    with django_capture_on_commit_callbacks(execute=True):  # the config version bump
        paused = client.post(feature_url(world.chat, "status"), {"status": "paused"})

    assert paused.status_code == 302 and paused["Location"] == feature_url(world.chat)
    world.chat.refresh_from_db()
    assert world.chat.status == "paused"
    refused = reserve()
    assert refused.status_code == 423 and refused.json()["error"] == "feature_paused"
    assert reserve(feature="batch").status_code == 201
    entry = LogEntry.objects.get(object_id=str(world.chat.pk))
    assert entry.user == owners.owner and entry.get_change_message() == "Paused the feature."
    record = world.chat.history.first()
    assert (record.history_user, record.history_change_reason) == (
        owners.owner,
        "Paused the feature.",
    )

    with django_capture_on_commit_callbacks(execute=True):
        client.post(feature_url(world.chat, "status"), {"status": "active"})
    assert reserve().status_code == 201


def test_the_page_offers_pause_or_resume_as_the_feature_stands(world: Any, owners: Any) -> None:
    client = logged_in(owners.owner)
    assert 'id="feature-pause"' in client.get(feature_url(world.chat)).content.decode()
    client.post(feature_url(world.chat, "status"), {"status": "paused"})
    html = client.get(feature_url(world.chat)).content.decode()
    assert 'id="feature-resume"' in html and 'id="feature-pause"' not in html


def test_pause_needs_a_post_and_a_real_status(world: Any, owners: Any) -> None:
    client = logged_in(owners.owner)
    asked = client.get(feature_url(world.chat, "status"))  # the confirmation page
    assert asked.status_code == 200 and "Yes, pause it" in asked.content.decode()
    world.chat.refresh_from_db()
    assert world.chat.status == "active"
    client.post(feature_url(world.chat, "status"), {"status": "gone"})
    world.chat.refresh_from_db()
    assert world.chat.status == "active"


def test_the_changelist_pauses_several_features_at_once(world: Any, owners: Any) -> None:
    client = logged_in(owners.owner)
    chosen = {"action": "pause_features", "_selected_action": [world.chat.pk, world.batch.pk]}
    asked = client.post(reverse("admin:tenants_feature_changelist"), chosen)
    assert "Yes, pause them" in asked.content.decode() and "acme/batch" in asked.content.decode()
    world.chat.refresh_from_db()
    assert world.chat.status == "active"  # asking changes nothing

    client.post(reverse("admin:tenants_feature_changelist"), {**chosen, "post": "yes"})
    world.chat.refresh_from_db()
    world.batch.refresh_from_db()
    assert world.chat.status == world.batch.status == "paused"


def test_another_tenants_owner_reaches_nothing(world: Any, reserve: Any, owners: Any) -> None:
    limit = world.limit(tenant=world.tenant, feature=world.chat, metric="tokens", amount=10_000)
    assert reserve().status_code == 201
    client = logged_in(owners.other)

    page = client.get(feature_url(world.chat))
    pause = client.post(feature_url(world.chat, "status"), {"status": "paused"})
    boost = client.post(
        reverse("admin:quotas_limit_boost", args=[limit.pk]), {"amount": 1, "hours": 1}
    )
    tenant = client.get(reverse("admin:tenants_tenant_change", args=[world.tenant.pk]))
    index = client.get(reverse("admin:index"))

    assert page.status_code == 302  # the admin's answer to an object the user may not see
    assert pause.status_code == boost.status_code == 404
    assert tenant.status_code == 302
    world.chat.refresh_from_db()
    limit.refresh_from_db()
    assert world.chat.status == "active" and limit.boost_amount is None
    assert "acme" not in index.content.decode()


# -- boosts -------------------------------------------------------------------------------


def test_a_boost_raises_the_cap_at_once_and_is_audited(
    world: Any, reserve: Any, owners: Any, django_capture_on_commit_callbacks: Any
) -> None:
    limit = world.limit(
        tenant=world.tenant, feature=world.chat, metric="requests", window="day", amount=2
    )
    assert reserve().status_code == reserve().status_code == 201
    assert reserve().status_code == 429
    client = logged_in(owners.owner)
    assert (
        "Boost" in client.get(reverse("admin:quotas_limit_boost", args=[limit.pk])).content.decode()
    )

    with django_capture_on_commit_callbacks(execute=True):
        boosted = client.post(
            reverse("admin:quotas_limit_boost", args=[limit.pk]), {"amount": "4", "hours": "4"}
        )

    assert boosted.status_code == 302 and boosted["Location"] == feature_url(world.chat)
    limit.refresh_from_db()
    assert limit.boost_amount == Decimal(4)
    assert timedelta(hours=3, minutes=59) < limit.boost_until - timezone.now() <= timedelta(hours=4)
    assert reserve().status_code == 201
    row = limit_row(client.get(feature_url(world.chat)).content.decode(), limit.pk)
    assert cell(row, "cap") == "4" and "boosted" in row
    assert LogEntry.objects.get(object_id=str(limit.pk)).user == owners.owner
    assert limit.history.first().history_user == owners.owner

    with django_capture_on_commit_callbacks(execute=True):
        client.post(reverse("admin:quotas_limit_boost", args=[limit.pk]), {"end": "1"})
    limit.refresh_from_db()
    assert limit.boost_amount is None and reserve().status_code == 429


def test_a_boost_must_raise_the_amount_and_end_within_a_month(world: Any, owners: Any) -> None:
    limit = world.limit(tenant=world.tenant, feature=world.chat, metric="tokens", amount=1_000)
    client = logged_in(owners.owner)
    url = reverse("admin:quotas_limit_boost", args=[limit.pk])

    lower = client.post(url, {"amount": "500", "hours": "4"})
    fraction = client.post(url, {"amount": "1500.5", "hours": "4"})
    forever = client.post(url, {"amount": "2000", "hours": "9999"})

    assert "The boosted amount must be above the amount." in lower.content.decode()
    assert "is a whole number" in fraction.content.decode()
    assert "Select a valid choice" in forever.content.decode()
    limit.refresh_from_db()
    assert limit.boost_amount is None
    now = timezone.now()
    with pytest.raises(Exception, match="at most 31 days"):
        limit_boost(limit=limit, amount=Decimal(2000), until=now + timedelta(days=32), now=now)
    with pytest.raises(Exception, match="in the future"):
        limit_boost(limit=limit, amount=Decimal(2000), until=now, now=now)


def test_every_process_drops_a_boost_when_it_ends(
    world: Any, reserve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = world.limit(
        tenant=world.tenant, feature=world.chat, metric="requests", window="day", amount=1
    )
    now = timezone.now()
    until = now + timedelta(minutes=5)
    limit_boost(limit=limit, amount=Decimal(3), until=until, now=now)
    plans.clear()
    assert reserve().status_code == reserve().status_code == 201
    plan = plans.get()
    assert plan.limits[limit.pk].amount == Decimal(3)
    assert plan.valid_until == until.timestamp()

    later = until.timestamp() + 1
    monkeypatch.setattr("quotas.plan.load.time.time", lambda: later)
    monkeypatch.setattr(
        "quotas.plan.load.timezone.now", lambda: datetime.fromtimestamp(later, tz=UTC)
    )

    assert plans.get() is not plan and plans.get().limits[limit.pk].amount == Decimal(1)
    assert reserve().status_code == 429


def test_a_plan_without_boosts_never_expires(world: Any) -> None:
    world.limit(tenant=world.tenant, feature=world.chat, metric="tokens", amount=1_000)
    assert plan_load().valid_until == float("inf")


# -- API keys -----------------------------------------------------------------------------


def test_revoking_a_key_from_its_page_refuses_it_at_once(
    world: Any, reserve: Any, owners: Any, django_capture_on_commit_callbacks: Any
) -> None:
    assert reserve().status_code == 201
    key = ApiKey.objects.get(tenant=world.tenant)
    client = logged_in(owners.owner)
    page = client.get(reverse("admin:quotas_apikey_change", args=[key.pk]))
    assert 'id="apikey-revoke"' in page.content.decode()

    with django_capture_on_commit_callbacks(execute=True):
        client.post(reverse("admin:quotas_apikey_revoke", args=[key.pk]))

    key.refresh_from_db()
    assert key.revoked_at is not None
    assert reserve().status_code == 401
    assert LogEntry.objects.get(object_id=str(key.pk)).get_change_message() == "Revoked the key."
    assert (
        logged_in(owners.other)
        .post(reverse("admin:quotas_apikey_revoke", args=[key.pk]))
        .status_code
        == 404
    )


# -- the dashboard ------------------------------------------------------------------------


def test_the_dashboard_ranks_limits_by_use_within_the_owners_tenants(
    world: Any, reserve: Any, owners: Any
) -> None:
    busy = world.limit(
        tenant=world.tenant, feature=world.chat, metric="requests", window="day", amount=4
    )
    quiet = world.limit(
        tenant=world.tenant, feature=world.batch, metric="requests", window="day", amount=100
    )
    theirs = world.limit(tenant=owners.bravo, metric="requests", window="day", amount=1)
    for _ in range(3):
        assert reserve().status_code == 201

    html = logged_in(owners.owner).get(reverse("admin:index")).content.decode()

    closest = html[html.index('id="closest"') : html.index('id="top-consumers"')]
    assert closest.index(f'data-limit-id="{busy.pk}"') < closest.index(
        f'data-limit-id="{quiet.pk}"'
    )
    assert 'class="console-bar full"' not in limit_row(closest, busy.pk)  # 75%: warn
    assert 'class="console-bar warn"' in limit_row(closest, busy.pk)
    assert f'data-limit-id="{theirs.pk}"' not in html
    assert feature_url(world.chat) in closest


def test_the_dashboard_shows_top_consumers_rising_truncation_and_alerts(
    world: Any, owners: Any
) -> None:
    now = timezone.now()
    hour = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    for tenant, feature, tokens, truncated, before in (
        ("acme", "chat", 9_000, 30, 0),
        ("acme", "batch", 5_000, 0, 0),
        ("bravo", "bravo-chat", 99_000, 90, 0),
    ):
        UsageRollup.objects.create(
            grain="hour",
            start=hour,
            tenant=tenant,
            feature=feature,
            pool=world.pool.slug,
            model="m",
            requests=200,
            input_tokens=tokens,
            truncated=truncated,
        )
        UsageRollup.objects.create(
            grain="hour",
            start=hour - timedelta(hours=30),
            tenant=tenant,
            feature=feature,
            pool=world.pool.slug,
            model="m",
            requests=200,
            truncated=before,
        )
    notification = Notification.objects.create(group="f", window_start=now, created_at=now)
    Alert.objects.create(
        key="k1",
        kind="threshold",
        subject="limit:1@0.8",
        tenant=world.tenant,
        feature=world.chat,
        level=0.8,
        fired_at=now,
        fired_in=notification,
        details={"limit_name": "acme / chat: 10,000 tokens per day"},
    )
    Delivery.objects.create(
        notification=notification,
        tenant=world.tenant,
        kind="slack",
        target="hooks.example",
        status="failed",
        error="HTTP 500",
        created_at=now,
    )
    Alert.objects.create(
        key="k2",
        kind="threshold",
        subject="limit:2@0.8",
        tenant=owners.bravo,
        level=0.8,
        fired_at=now,
        details={"limit_name": "bravo: 5,000 tokens per day"},
    )

    html = logged_in(owners.owner).get(reverse("admin:index")).content.decode()
    top = html[html.index('id="top-consumers"') : html.index('id="rising-truncation"')]
    rising = html[html.index('id="rising-truncation"') : html.index('id="recent-alerts"')]
    alerts = html[html.index('id="recent-alerts"') :]

    assert top.index("acme/chat") < top.index("acme/batch") and "9,000" in top
    assert "bravo" not in top
    assert "acme/chat" in rising and "15.0%" in rising and "acme/batch" not in rising
    # the alert in words, never its internal subject
    assert "80% of acme / chat: 10,000 tokens per day" in alerts and "slack: failed" in alerts
    assert "limit:1@0.8" not in alerts
    assert "bravo: 5,000 tokens per day" not in alerts

    root = logged_in(owners.root).get(reverse("admin:index")).content.decode()
    assert "bravo/bravo-chat" in root and "80% of bravo: 5,000 tokens per day" in root


def test_a_superusers_dashboard_shows_the_minutely_snapshot_with_live_bars(
    world: Any, reserve: Any, owners: Any
) -> None:
    busy = world.limit(
        tenant=world.tenant, feature=world.chat, metric="requests", window="day", amount=4
    )
    world.limit(tenant=world.tenant, feature=world.batch, metric="requests", window="day", amount=9)
    for _ in range(2):
        assert reserve().status_code == 201
    assert refresh_platform_snapshot() == 2
    hour = timezone.now().astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    UsageRollup.objects.create(  # after the snapshot: shown from the next one
        grain="hour", start=hour, tenant="acme", feature="chat", pool="shared", input_tokens=77
    )
    assert reserve().status_code == 201

    html = logged_in(owners.root).get(reverse("admin:index")).content.decode()

    closest = html[html.index('id="closest"') : html.index('id="top-consumers"')]
    assert cell(limit_row(closest, busy.pk), "used") == "3"  # live, not as of the snapshot
    assert "As of" in html and "acme/chat" not in html[html.index('id="top-consumers"') :]

    refresh_platform_snapshot()
    html = logged_in(owners.root).get(reverse("admin:index")).content.decode()
    assert "acme/chat" in html[html.index('id="top-consumers"') :]


def test_a_key_made_a_moment_ago_works_at_once_in_a_process_with_an_older_plan(
    world: Any, reserve: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from quotas.keys import api_key_create

    assert reserve().status_code == 201  # this process now holds a plan without the new key
    with django_capture_on_commit_callbacks(execute=True):
        issued = api_key_create(tenant=world.tenant, name="new")

    assert reserve(client=world.client(issued.secret)).status_code == 201


# -- edges: limits that never reset, refused boosts, overruns, revoked keys ---------------


def test_feature_page_with_a_concurrency_limit_renders(world: Any, owners: Any) -> None:
    world.limit(tenant=world.tenant, feature=world.chat, metric="concurrent", window="", amount=5)
    page = logged_in(owners.owner).get(feature_url(world.chat))
    assert page.status_code == 200


def test_tenant_page_with_a_concurrency_limit_renders(world: Any, owners: Any) -> None:
    world.limit(tenant=world.tenant, metric="concurrent", window="", amount=5)
    page = logged_in(owners.owner).get(
        reverse("admin:tenants_tenant_change", args=[world.tenant.pk])
    )
    assert page.status_code == 200


def test_owner_dashboard_with_a_concurrency_limit_renders(world: Any, owners: Any) -> None:
    world.limit(tenant=world.tenant, metric="concurrent", window="", amount=5)
    page = logged_in(owners.owner).get(reverse("admin:index"))
    assert page.status_code == 200


def test_superuser_dashboard_and_pool_page_with_a_pool_concurrency_limit_render(
    world: Any, owners: Any
) -> None:
    world.limit(pool=world.pool, metric="concurrent", window="", amount=50)
    client = logged_in(owners.root)
    assert client.get(reverse("admin:index")).status_code == 200
    assert (
        client.get(reverse("admin:providers_pool_change", args=[world.pool.pk])).status_code == 200
    )


def test_a_refused_boost_is_not_shown_as_running(world: Any, owners: Any) -> None:
    limit = world.limit(tenant=world.tenant, feature=world.chat, metric="tokens", amount=1000)
    url = reverse("admin:quotas_limit_boost", args=[limit.pk])
    page = logged_in(owners.owner).post(url, {"amount": "1500.5", "hours": "4"})
    assert page.status_code == 200
    html = page.content.decode()
    assert "whole number" in html
    limit.refresh_from_db()
    assert limit.boost_amount is None
    assert "It is boosted to" not in html
    assert "End the boost now" not in html


def test_a_revoked_key_is_refused_by_the_next_read(
    world: Any, reserve: Any, owners: Any, django_capture_on_commit_callbacks: Any
) -> None:
    assert reserve().status_code == 201
    assert world.client().get("/api/v1/features/chat/usage").status_code == 200
    key = ApiKey.objects.get(tenant=world.tenant)
    with django_capture_on_commit_callbacks(execute=True):
        logged_in(owners.owner).post(reverse("admin:quotas_apikey_revoke", args=[key.pk]))
    assert world.client().get("/api/v1/features/chat/usage").status_code == 401


def test_a_soft_limit_over_its_cap_shows_what_the_engine_counts(
    world: Any, reserve: Any, owners: Any
) -> None:
    soft = world.limit(
        tenant=world.tenant,
        feature=world.chat,
        metric="requests",
        window="day",
        amount=2,
        enforcement="soft",
    )
    for _ in range(3):
        assert reserve().status_code == 201
    html = logged_in(owners.owner).get(feature_url(world.chat)).content.decode()
    row = limit_row(html, soft.pk)
    plan = plans.fresh()
    engine = get_engine()
    space = engine.tenant_space(world.tenant.id)
    check = plan.inspection_check(plan.limits[soft.pk], space, engine.now_ms_estimate())
    assert engine.inspect([check], space=space)[0]["used"] == 3  # what the engine counts
    assert cell(row, "used") == "3"


def test_the_limit_form_refuses_a_boost_the_boost_page_would_refuse(
    world: Any, owners: Any
) -> None:
    limit = world.limit(tenant=world.tenant, feature=world.chat, metric="tokens", amount=1000)
    client = logged_in(owners.owner)
    url = reverse("admin:quotas_limit_change", args=[limit.pk])
    form = client.get(url).context["adminform"].form
    data = {}
    for name, field in form.fields.items():
        value = form.initial.get(name, field.initial)
        if value is None:
            continue
        if hasattr(value, "pk"):
            value = value.pk
        data[name] = value
    far = timezone.localtime(timezone.now() + timedelta(days=3650))
    data.update(
        {
            "boost_amount": "500",
            "boost_until_0": far.strftime("%Y-%m-%d"),
            "boost_until_1": far.strftime("%H:%M:%S"),
            "alert_at": "[]",
        }
    )
    data = {k: v for k, v in data.items() if k != "boost_until"}
    client.post(url, data)
    limit.refresh_from_db()
    assert limit.boost_until is None  # a boost below the amount, for ten years, is refused


def test_the_dashboard_drops_a_resolve_once_the_same_threshold_fired_again(
    world: Any, owners: Any
) -> None:
    """Boosted (the 100% resolved), the boost ended (it fired again): the dashboard says it
    is firing, not resolved beside a full bar."""
    now = timezone.now()
    common = {
        "kind": "threshold",
        "subject": "limit:1@1.0",
        "tenant": world.tenant,
        "feature": world.chat,
        "level": 1.0,
        "details": {"limit_name": "acme / chat: 10,000 tokens per day"},
    }
    Alert.objects.create(
        key="k#1", state="resolved", fired_at=now - timedelta(minutes=9), resolved_at=now, **common
    )
    Alert.objects.create(key="k#2", state="firing", fired_at=now, **common)
    html = logged_in(owners.owner).get(reverse("admin:index")).content.decode()
    alerts = html[html.index('id="recent-alerts"') :]
    assert alerts.count("100% of acme / chat: 10,000 tokens per day") == 1
    assert "firing" in alerts and "resolved" not in alerts


def test_a_guarantee_is_drawn_as_a_guarantee_not_as_a_cap(world: Any, owners: Any) -> None:
    """A share kept for the feature: using all of it is what it is for, so no red bar and no
    boost link, and its amount without the database's decimals."""
    world.limit(pool=world.pool, metric="tokens", amount=100_000)  # the pool's capacity
    guarantee = world.limit(
        tenant=world.tenant, feature=world.chat, pool=world.pool, metric="tokens", guaranteed=20_000
    )
    row = limit_row(
        logged_in(owners.root).get(feature_url(world.chat)).content.decode(), guarantee.pk
    )
    assert 'class="console-bar guarantee"' in row and ">guaranteed<" in row
    assert "boost" not in row and cell(row, "cap") == "20,000"
    page = logged_in(owners.root).get(reverse("admin:quotas_limit_change", args=[guarantee.pk]))
    assert 'value="20000"' in page.content.decode()


def test_the_pool_page_shows_the_share_and_breaker_now_and_over_the_last_hours(
    world: Any, reserve: Any, owners: Any
) -> None:
    from ledger.services import usage_ingest

    world.pool.backpressure = {"adaptive": True, "breaker_min_calls": 2}
    world.pool.save()
    world.limit(pool=world.pool, metric="tokens", amount=100_000)
    for status in (429, 502):  # two calls, one failed: the breaker opens
        rid = reserve().json()["id"]
        released = world.client().post(
            f"/api/v1/reservations/{rid}/release", {"upstream_status": status}, format="json"
        )
        assert released.status_code == 200
        if status == 429:
            get_engine().frozen_ms += 1000  # the 429 emptied the pool's bucket: let it refill
    usage_ingest()

    page = logged_in(owners.root).get(reverse("admin:providers_pool_change", args=[world.pool.pk]))

    text = page.content.decode()
    assert "Following the provider" in text
    assert "Effective share of the configured per-minute limits: <strong>70%</strong>" in text
    assert "Circuit breaker: <strong>open for 30 s more</strong>" in text
    assert "<polyline points=" in text and 'fill="#f3c4c4"' in text  # the open span
    assert "pool breaker opened" not in text  # kinds are shown by their labels
    assert "breaker opened" in text and "adapted" in text
