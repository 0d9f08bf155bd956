"""The ledger's Prometheus metrics, computed when `/metrics` is scraped: how long the usage
stream is and how far the ledger is behind it (a few Redis reads per partition, once per
scrape). On a partitioned store the lengths and backlogs are summed over the partitions'
streams and the lag is the worst of them, of the streams that answer (a shard failing over
is left out)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import redis
from prometheus_client.core import GaugeMetricFamily, Metric

from ledger.services import usage_streams
from quotas.store import STORE_UNREACHABLE, each_answering, get_engine

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StreamState:
    length: int  # entries in the usage streams, acknowledged or not
    backlog: int  # entries the ledger has not acknowledged yet
    lag_seconds: float  # age of the oldest of those; 0 when there is none


def ledger_lag_seconds() -> float:
    """How long the oldest usage event not yet in the ledger has waited (Redis's clock), of
    every partition's stream that answers: a shard failing over is left out (its events wait
    in its stream, and count once it is back); raises when none answers."""
    ages = each_answering(usage_streams(), lambda stream: stream.oldest_unacknowledged_ms())
    oldest = min((age for age in ages if age is not None), default=None)
    if oldest is None:
        return 0.0
    engine = get_engine()
    try:
        now_ms = engine.now_ms()
    except STORE_UNREACHABLE:  # the node that tells the time is the one failing over
        now_ms = engine.now_ms_estimate()
    return max(0, now_ms - oldest) / 1000


def stream_state() -> StreamState:
    """Summed over every partition's stream that answers: a shard failing over is left out,
    as from the lag; raises when none answers."""
    sizes = each_answering(usage_streams(), lambda stream: (stream.length(), stream.backlog()))
    return StreamState(
        length=sum(length for length, _ in sizes),
        backlog=sum(backlog for _, backlog in sizes),
        lag_seconds=ledger_lag_seconds(),
    )


class LedgerCollector:
    """A prometheus-client collector, registered in the registry that `/metrics` builds."""

    def collect(self) -> Iterator[Metric]:
        try:
            state = stream_state()
        except (*STORE_UNREACHABLE, redis.ResponseError) as exc:
            log.warning("ledger metrics unavailable: %s", exc)
            return
        yield GaugeMetricFamily(
            "quota_usage_stream_length",
            "Entries in the usage streams (every partition's).",
            value=state.length,
        )
        yield GaugeMetricFamily(
            "quota_ledger_backlog_events",
            "Usage events the ledger has not acknowledged yet.",
            value=state.backlog,
        )
        yield GaugeMetricFamily(
            "quota_ledger_lag_seconds",
            "Age of the oldest usage event not yet in the ledger (0: none waits).",
            value=state.lag_seconds,
        )
