"""The usage stream's length and the ledger's lag, as a scrape computes them."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from ledger.metrics import LedgerCollector, stream_state
from ledger.services import usage_ingest, usage_streams
from quotas.engine import Engine
from quotas.store import get_engine
from tests.fixtures import World
from tests.ledger.partitions import stream_of, tenant_elsewhere, three_partitions

__all__ = ["three_partitions"]  # a fixture


def scraped() -> dict[str, float]:
    return {m.name: m.samples[0].value for m in LedgerCollector().collect()}


def test_the_stream_grows_with_traffic_and_the_lag_falls_to_zero_once_ingested(
    world: World, reserve: Any
) -> None:
    assert scraped()["quota_usage_stream_length"] == 0
    for _ in range(3):
        assert reserve().status_code == 201
    get_engine().clock_offset_ms = 5_000  # the oldest event waits 5 s or more

    waiting = scraped()
    assert waiting["quota_usage_stream_length"] == 3
    assert waiting["quota_ledger_backlog_events"] == 3
    assert waiting["quota_ledger_lag_seconds"] >= 5

    assert usage_ingest().entries == 3
    done = scraped()
    assert done["quota_ledger_backlog_events"] == 0
    assert done["quota_ledger_lag_seconds"] == 0
    assert done["quota_usage_stream_length"] == 3  # until trimmed


def test_entries_read_but_not_acknowledged_still_count_as_lag(world: World, reserve: Any) -> None:
    assert reserve().status_code == 201
    stream = stream_of(world)
    stream.ensure_group()
    assert len(stream.read("a-consumer-that-dies", count=10)) == 1
    get_engine().clock_offset_ms = 5_000

    state = stream_state()
    assert (state.backlog, state.lag_seconds >= 5) == (1, True)


def test_a_partition_failing_over_is_left_out_and_the_others_still_shown(
    world: World, reserve: Any, three_partitions: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, other_client = tenant_elsewhere(world, "globex")
    for _ in range(2):
        assert reserve().status_code == 201
    assert reserve(client=other_client).status_code == 201

    def down(*args: Any) -> Any:
        raise redis.exceptions.SlotNotCoveredError("no master for the slot")

    ours = stream_of(world)
    for method in ("length", "backlog", "oldest_unacknowledged_ms"):
        monkeypatch.setattr(ours, method, down)

    shown = scraped()
    assert shown["quota_usage_stream_length"] == 1  # the other tenant's partition
    assert shown["quota_ledger_backlog_events"] == 1
    assert "quota_ledger_lag_seconds" in shown

    for stream in usage_streams():
        for method in ("length", "backlog", "oldest_unacknowledged_ms"):
            monkeypatch.setattr(stream, method, down)
    assert scraped() == {}  # none answers: no gauge, rather than a false zero
