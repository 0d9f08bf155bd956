"""The ledger's admin pages: read-only lists and the drift report, for superusers only."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse

from ledger.models import DeadLetter
from ledger.reconcile import budgets_reconcile
from ledger.rollups import rollups_update
from ledger.services import usage_ingest, usage_stream
from quotas.plan import plans
from quotas.reservations import get_engine
from tests.factories import UserFactory
from tests.fixtures import World

pytestmark = pytest.mark.django_db


def test_superusers_see_the_ledger_and_repair_drift_from_the_drift_page(
    world: World, reserve: Any
) -> None:
    day = world.limit(tenant=world.tenant, metric="tokens", window="day", amount=10_000)
    reserve()
    usage_ingest()
    rollups_update()
    plan, engine = plans.get(), get_engine()
    space = engine.tenant_space(world.tenant.id)  # where the tenant's budget is counted
    check = plan.inspection_check(plan.limits[day.id], space, engine.now_ms_estimate())
    engine.client.incrby(check.periods[1].key, 42)
    root = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(root)

    for model in ("usageevent", "refusal", "usagerollup", "providerusage"):
        assert client.get(reverse(f"admin:ledger_{model}_changelist")).status_code == 200
    page = client.get(reverse("admin:ledger_drift"))
    assert page.status_code == 200 and "1 drifted" in page.content.decode()

    assert client.post(reverse("admin:ledger_drift")).status_code == 302
    assert budgets_reconcile().drifted == []


def test_owners_do_not_see_the_ledger(world: World) -> None:
    client = Client()
    client.force_login(UserFactory())
    assert client.get(reverse("admin:ledger_usageevent_changelist")).status_code == 403
    assert client.get(reverse("admin:ledger_drift")).status_code == 403


def _park_one(world: World, reserve: Any) -> str:
    reserve()
    stream = usage_stream()
    bad_id = stream.client.xadd(
        stream.key, {"type": "committed", "rid": "rsv_bad", "finish_reason": b"stop\xff"}
    )
    assert usage_ingest().parked == 1
    return str(bad_id)


def test_superusers_see_dead_letters_with_their_error_and_raw_fields(
    world: World, reserve: Any
) -> None:
    bad_id = _park_one(world, reserve)
    letter = DeadLetter.objects.get()
    root = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(root)

    listing = client.get(reverse("admin:ledger_deadletter_changelist")).content.decode()
    assert bad_id in listing and "UnicodeEncodeError" in listing
    page = client.get(reverse("admin:ledger_deadletter_change", args=[letter.pk]))
    assert page.status_code == 200
    assert "stop\\udcff" in page.content.decode()  # the byte that was not UTF-8, escaped
    assert b'name="_save"' not in page.content  # read-only

    owner = Client()
    owner.force_login(UserFactory())
    assert owner.get(reverse("admin:ledger_deadletter_changelist")).status_code == 403
