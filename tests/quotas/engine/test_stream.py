"""The usage stream as the ledger's consumer group sees it, against the real Redis."""

from __future__ import annotations

import redis

from quotas.engine.stream import UsageStream


def test_the_backlog_counts_undelivered_entries_when_redis_cannot_tell_the_lag(
    redis_db: redis.Redis,
) -> None:
    stream = UsageStream(redis_db, "events", "ledger")
    for n in range(10):
        redis_db.xadd("events", {"n": n})
    stream.ensure_group()
    first = [entry_id for entry_id, _ in stream.read("c", count=4)]
    assert stream.backlog() == 10  # 4 pending, 6 never delivered

    # as a group loaded from an AOF is: its position kept, the count of entries it read lost
    redis_db.xgroup_setid("events", "ledger", first[-1])
    assert redis_db.xinfo_groups("events")[0]["lag"] is None
    assert stream.backlog() == 10
    rest = [entry_id for entry_id, _ in stream.read("c", count=10)]
    assert len(rest) == 6 and stream.ack(first + rest) == 10
    assert stream.backlog() == 0
