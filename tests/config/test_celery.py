"""Celery's side of the metrics: a task that ends in an exception is counted by name."""

from __future__ import annotations

import pytest

import ledger.tasks
from tests.metrics import Moves


def test_a_failing_task_is_counted_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> int:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(ledger.tasks, "usage_stream_trim", broken)
    moves = Moves(("quota_celery_task_failures_total", {"task": "ledger.tasks.ledger_trim_stream"}))

    result = ledger.tasks.ledger_trim_stream.apply()

    assert result.failed()
    assert moves.moved() == [1]
