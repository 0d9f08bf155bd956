"""The ledger's Celery wiring: every beat entry names a registered task, and the tasks run."""

from __future__ import annotations

from typing import Any

import pytest

from config.celery import app
from ledger import tasks
from ledger.models import UsageEvent, UsageRollup
from tests.fixtures import World

pytestmark = pytest.mark.django_db

LEDGER_ENTRIES = {
    "ledger-ingest",
    "ledger-trim-stream",
    "ledger-rollups",
    "ledger-budget-drift",
    "ledger-prune",
}


def test_every_ledger_beat_entry_names_a_registered_task() -> None:
    app.loader.import_default_modules()
    schedule = app.conf.beat_schedule
    assert set(schedule) >= LEDGER_ENTRIES
    for name in LEDGER_ENTRIES:
        assert schedule[name]["task"] in app.tasks
    assert schedule["ledger-ingest"]["schedule"] <= 1.0


def test_the_tasks_ingest_roll_up_check_drift_trim_and_prune(world: World, reserve: Any) -> None:
    world.limit(tenant=world.tenant, metric="tokens", window="day", amount=10_000)
    rid = reserve().json()["id"]
    world.client().post(
        f"/api/v1/reservations/{rid}/commit", {"input_tokens": 5, "output_tokens": 5}, format="json"
    )

    assert tasks.ledger_ingest.delay().get() == 2
    assert UsageEvent.objects.get().state == "committed"
    assert tasks.ledger_rollups.delay().get() == 1
    assert UsageRollup.objects.filter(grain="day").get().requests == 1
    assert tasks.ledger_budget_drift.delay().get() == 0
    assert tasks.ledger_trim_stream.delay().get() == 2
    assert tasks.ledger_prune_old.delay().get()["usage"] == 0
