"""The usage stream's length and the ledger's lag, as a scrape computes them."""

from __future__ import annotations

from typing import Any

from ledger.metrics import LedgerCollector, stream_state
from ledger.services import usage_ingest
from quotas.store import get_engine
from tests.fixtures import World
from tests.ledger.partitions import stream_of


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
