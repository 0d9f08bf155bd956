"""The retry storm's tables and chart: per run, what the platform and the provider were asked
per logical call and the largest call's wait against its promise; per class, the waits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: the chart is a file

import matplotlib.pyplot as plt

from sim.provider import Latency
from sim.report import Columns, percentile
from sim.storm import StormCall, StormRun
from sim.traffic import BATCH, CHAT

CLASSES = {CHAT: "interactive", BATCH: "batch"}


@dataclass(frozen=True)
class RunSummary:
    run: str
    calls: int
    reserves_per_call: str  # "-" without the platform
    commits_per_call: str
    provider_calls_per_call: float
    provider_429s: int
    gave_up: int
    largest_wait: float  # seconds, from waking
    largest_promised: str  # seconds, when it was scheduled
    largest_kept: str  # seconds, from its reservation (which the promise counts from)
    seconds: float


@dataclass(frozen=True)
class ClassWaits:
    run: str
    cls: str
    calls: int
    p50: float
    p95: float
    p99: float
    max: float


RUN_COLUMNS: Columns = (
    ("run", "run"),
    ("calls", "calls"),
    ("platform reserves / call", "reserves_per_call"),
    ("commits / call", "commits_per_call"),
    ("provider calls / call", "provider_calls_per_call"),
    ("provider 429s", "provider_429s"),
    ("gave up", "gave_up"),
    ("largest wait s", "largest_wait"),
    ("largest promised s", "largest_promised"),
    ("largest waited from promise s", "largest_kept"),
    ("all done s", "seconds"),
)
WAIT_COLUMNS: Columns = (
    ("run", "run"),
    ("class", "cls"),
    ("calls", "calls"),
    ("p50 wait s", "p50"),
    ("p95 wait s", "p95"),
    ("p99 wait s", "p99"),
    ("max wait s", "max"),
)


def _latency(run: StormRun) -> Latency:
    return Latency(run.storm.first_token_s, run.storm.per_token_s)


def waits(run: StormRun, calls: list[StormCall]) -> list[float]:
    return [c.wait(_latency(run), run.storm.patience) for c in calls]


def tallies(run: StormRun) -> dict[str, int]:
    """What the run counted: reserves (granted or refused) and their outcomes at the
    platform, calls and 429s at the provider, callers that gave up."""
    events = run.events
    return {
        "reserves": events.get("reserved", 0) + events.get("refused", 0),
        "reserved": events.get("reserved", 0),
        "committed": events.get("committed", 0),
        "settled": events.get("committed", 0) + events.get("released", 0),
        "provider_calls": len(run.provider_log),
        "provider_429s": sum(1 for e in run.provider_log if e.status == 429),
        "gave_up": sum(1 for c in run.calls if c.done is None),
    }


def run_summary(run: StormRun) -> RunSummary:
    n = len(run.calls)
    largest = next(c for c in run.calls if c.largest)
    platform = run.mode != "no platform"
    counted = tallies(run)
    promised = run.promised_ms if run.mode == "scheduled" else None
    return RunSummary(
        run=run.mode,
        calls=n,
        reserves_per_call=f"{counted['reserves'] / n:.2f}" if platform else "-",
        commits_per_call=f"{counted['settled'] / n:.2f}" if platform else "-",
        provider_calls_per_call=counted["provider_calls"] / n,
        provider_429s=counted["provider_429s"],
        gave_up=counted["gave_up"],
        largest_wait=largest.wait(_latency(run), run.storm.patience),
        largest_promised=_seconds(promised),
        largest_kept=_seconds(run.kept_ms if promised is not None else None),
        seconds=run.seconds,
    )


def _seconds(ms: int | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.2f}"


def class_waits(run: StormRun) -> list[ClassWaits]:
    rows = []
    for feature, name in CLASSES.items():
        values = waits(run, [c for c in run.calls if c.feature == feature])
        rows.append(
            ClassWaits(
                run.mode,
                name,
                len(values),
                percentile(values, 0.5),
                percentile(values, 0.95),
                percentile(values, 0.99),
                max(values, default=0.0),
            )
        )
    return rows


def storm_chart(runs: list[StormRun], path: Path) -> Path:
    """Left: calls per logical call and provider 429s. Right: waits per class (p50, p95,
    p99), and the largest call's wait with its promise."""
    figure, (calls_ax, waits_ax) = plt.subplots(1, 2, figsize=(14, 5))
    names = [run.mode for run in runs]
    summaries = [run_summary(run) for run in runs]
    x = range(len(runs))
    reserves = [float(s.reserves_per_call) if s.reserves_per_call != "-" else 0 for s in summaries]
    calls_ax.bar([i - 0.2 for i in x], reserves, 0.4, label="platform reserves / call")
    provider = [s.provider_calls_per_call for s in summaries]
    calls_ax.bar([i + 0.2 for i in x], provider, 0.4, label="provider calls / call")
    calls_ax.set_xticks(list(x), names)
    calls_ax.set_ylabel("calls per logical call")
    calls_ax.set_title(f"{runs[0].storm.callers} callers wake together")
    twin = calls_ax.twinx()
    twin.plot(list(x), [s.provider_429s for s in summaries], "kx--", label="provider 429s")
    twin.set_ylabel("provider 429s")
    twin.set_ylim(bottom=0)
    handles, labels = calls_ax.get_legend_handles_labels()
    more, more_labels = twin.get_legend_handles_labels()
    calls_ax.legend(handles + more, labels + more_labels, loc="upper right", fontsize="small")

    width = 0.12
    for k, (q, shade) in enumerate((("p50", 0.45), ("p95", 0.7), ("p99", 0.95))):
        for j, cls in enumerate(CLASSES.values()):
            values = [getattr(class_waits(run)[j], q) for run in runs]
            offset = (k * 2 + j - 2.5) * width
            colour = ("tab:blue", "tab:orange")[j]
            waits_ax.bar(
                [i + offset for i in x],
                values,
                width,
                color=colour,
                alpha=shade,
                label=f"{cls} {q}",
            )
    waits_ax.plot(
        list(x),
        [s.largest_wait for s in summaries],
        "r*",
        markersize=12,
        label="largest call's wait",
    )
    promised = [float(s.largest_promised) for s in summaries if s.largest_promised != "-"]
    if promised:
        waits_ax.plot([len(runs) - 1], promised, "gD", label="its promised wait")
    waits_ax.set_xticks(list(x), names)
    waits_ax.set_ylabel("seconds from waking to the provider call")
    waits_ax.set_title("waits per class")
    waits_ax.legend(loc="upper left", fontsize="small", ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
