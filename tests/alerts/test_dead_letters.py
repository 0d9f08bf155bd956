"""The platform's admins hear once per new batch of dead letters, not once per event."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core import mail

from alerts.models import Alert, RuleKind
from alerts.services import alerts_run
from ledger.services import usage_ingest, usage_stream
from quotas.store import get_engine
from tests.fixtures import World

pytestmark = pytest.mark.django_db


def _park(count: int) -> None:
    stream = usage_stream()
    for n in range(count):
        fields = {"type": "committed", "rid": f"rsv_bad{n}", "output_tokens": "9" * 30}
        stream.client.xadd(stream.key, fields)
    assert usage_ingest().parked == count


def test_dead_letters_alert_the_superusers_once_per_new_batch(world: World, reserve: Any) -> None:
    get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    engine = get_engine()
    engine.frozen_ms = engine.now_ms()
    reserve()
    _park(3)

    alerts_run()
    alerts_run()  # nothing new: no second alert

    fired = Alert.objects.get(kind=RuleKind.DEAD_LETTERS)
    assert fired.details["count"] == 3 and fired.tenant is None
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["root@example.com"]
    assert "3 usage events the ledger could not store" in mail.outbox[0].subject
    assert "/admin/ledger/deadletter/" in mail.outbox[0].body
    fired.refresh_from_db()
    assert fired.state == "resolved"  # the second run found no new ones

    _park(2)
    engine.frozen_ms += 3_600_000  # past the storm window
    alerts_run()

    assert list(
        Alert.objects.filter(kind=RuleKind.DEAD_LETTERS).values_list("details__count", "state")
    ) == [(2, "firing"), (3, "resolved")]
    assert len(mail.outbox) == 2  # the new batch, with the end of the last one
    assert "2 usage events the ledger could not store" in mail.outbox[-1].body
