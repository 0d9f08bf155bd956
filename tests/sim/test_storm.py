"""A short retry storm on the real stack (live API server, real Redis, the SDK and the real
openai package against the simulator's fake provider): callers that wake together get the
provider answering 429s without the platform, retry the platform several times each with
refusals, and make one reserve each, with no provider 429, when they may wait in line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sim.report import markdown
from sim.storm import Storm, storm_runs
from sim.storm_report import RUN_COLUMNS, class_waits, run_summary, storm_chart, tallies

pytestmark = pytest.mark.slow

# Compressed: fewer callers and a faster model; the provider has 5% of a minute left when
# they wake, and the platform keeps that 5% for the interactive class.
SHORT = Storm(
    callers=30,
    interactive=6,
    tpm=60_000,
    protect=0.05,
    call_input=(40, 80),
    call_max_tokens=30,
    call_reply=(10, 30),
    largest_input=1_500,
    largest_max_tokens=100,
    first_token_s=0.02,
    per_token_s=0.001,
    patience=60.0,
)


def test_scheduled_admission_ends_the_retry_storm(
    live_server: Any, transactional_db: Any, tmp_path: Path
) -> None:
    runs = {run.mode: run for run in storm_runs(str(live_server.url), SHORT)}
    counts = {mode: tallies(run) for mode, run in runs.items()}
    print(counts)

    # Without the platform the callers storm the provider.
    assert counts["no platform"]["provider_429s"] > 0

    # With refusals, the platform is asked again and again; the provider is spared.
    assert counts["refusals + retries"]["reserves"] > SHORT.callers
    assert counts["refusals + retries"]["provider_429s"] == 0

    # Scheduled: one reserve and one commit per call, nothing refused, no provider 429, no
    # one gave up, and the largest call was promised a wait it then kept.
    scheduled = counts["scheduled"]
    assert scheduled["reserves"] == scheduled["reserved"] == SHORT.callers
    assert scheduled["committed"] == SHORT.callers
    assert scheduled["provider_429s"] == 0 and scheduled["gave_up"] == 0
    assert runs["scheduled"].promised_ms is not None and runs["scheduled"].promised_ms > 0

    rows = [run_summary(run) for run in runs.values()]
    assert markdown(rows, RUN_COLUMNS).count("\n") == 4
    assert all(len(class_waits(run)) == 2 for run in runs.values())
    assert storm_chart(list(runs.values()), tmp_path / "storm.png").stat().st_size > 10_000
