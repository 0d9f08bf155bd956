"""Alert deliveries are counted by kind and outcome as they are sent."""

from __future__ import annotations

import pytest
from pytest_httpserver import HTTPServer

from alerts.models import Channel
from alerts.services import channel_test
from tests.alerts import test_support as support
from tests.fixtures import World
from tests.metrics import Moves

fast_retries = support.fast_retries
pytestmark = pytest.mark.usefixtures("fast_retries")
DELIVERIES = "quota_alert_deliveries_total"


def test_deliveries_are_counted_by_kind_and_outcome(world: World, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/ok", method="POST").respond_with_data("ok")
    httpserver.expect_request("/down", method="POST").respond_with_data("oops", status=503)
    httpserver.expect_request("/gone", method="POST").respond_with_data("gone", status=410)
    moves = Moves(
        (DELIVERIES, {"kind": "webhook", "outcome": "sent"}),
        (DELIVERIES, {"kind": "webhook", "outcome": "failed"}),
        (DELIVERIES, {"kind": "webhook", "outcome": "failed_permanent"}),
    )

    for number, path in enumerate(("/ok", "/ok", "/down", "/gone")):
        hook = Channel.objects.create(
            tenant=world.tenant,
            name=f"hook {number}",
            kind="webhook",
            target=httpserver.url_for(path),
        )
        channel_test(channel_id=hook.pk)

    assert moves.moved() == [2, 1, 1]
