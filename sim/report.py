"""The simulator's table: one row per feature and run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sim.run import Run
from sim.traffic import BATCH, CHAT, Call


@dataclass(frozen=True)
class Summary:
    run: str
    feature: str
    calls: int  # answered
    gave_up: int
    tokens_per_min: float  # input + output of answered calls, per minute of the feature's time
    p50_wait: float
    p95_wait: float
    refusals: int
    upstream_429s: int
    truncated: int


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measured(run: Run, feature: str) -> list[Call]:
    """The feature's calls made after the warm-up."""
    return [c for c in run.calls if c.feature == feature and c.wanted >= run.scenario.warmup]


def summarise(run: Run, feature: str) -> Summary:
    calls = measured(run, feature)
    answered = [c for c in calls if not c.gave_up]
    active = run.seconds - run.scenario.warmup
    waits = [c.wait(c.wanted + run.scenario.chat_patience) for c in calls]
    if feature == BATCH:  # a batch call is never given up but at the end of the run
        waits = [c.wait(run.seconds) for c in answered]
    tokens = sum(c.input_tokens + c.output_tokens for c in answered)
    return Summary(
        run=run.name,
        feature=feature,
        calls=len(answered),
        gave_up=len(calls) - len(answered) if feature == CHAT else 0,
        tokens_per_min=tokens / active * 60 if active > 0 else 0.0,
        p50_wait=percentile(waits, 0.5),
        p95_wait=percentile(waits, 0.95),
        refusals=sum(c.refusals for c in calls),
        upstream_429s=sum(c.upstream_429s for c in calls),
        truncated=sum(c.truncated for c in answered),
    )


def summaries(runs: list[Run]) -> list[Summary]:
    return [summarise(run, feature) for run in runs for feature in (CHAT, BATCH)]


Columns = tuple[tuple[str, str], ...]  # (title, attribute) of each column
COLUMNS: Columns = (
    ("run", "run"),
    ("feature", "feature"),
    ("tokens/min", "tokens_per_min"),
    ("answered", "calls"),
    ("gave up", "gave_up"),
    ("p50 wait s", "p50_wait"),
    ("p95 wait s", "p95_wait"),
    ("refusals", "refusals"),
    ("upstream 429s", "upstream_429s"),
    ("truncated", "truncated"),
)


def _cell(attr: str, value: object) -> str:
    if attr == "tokens_per_min":
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _rows(rows: Sequence[object], columns: Columns) -> list[list[str]]:
    return [[_cell(attr, getattr(row, attr)) for _, attr in columns] for row in rows]


def table(rows: Sequence[object], columns: Columns = COLUMNS) -> str:
    """Plain text, aligned, for the terminal: two text columns, then numbers."""
    cells = [[title for title, _ in columns], *_rows(rows, columns)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for n, row in enumerate(cells):
        left, right = row[:2], row[2:]
        text = "  ".join(c.ljust(w) for c, w in zip(left, widths[:2], strict=True))
        text += "  " + "  ".join(c.rjust(w) for c, w in zip(right, widths[2:], strict=True))
        lines.append(text.rstrip())
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def markdown(rows: Sequence[object], columns: Columns = COLUMNS) -> str:
    header = "| " + " | ".join(title for title, _ in columns) + " |"
    rule = "| --- | --- |" + " ---: |" * (len(columns) - 2)
    body = ("| " + " | ".join(r) + " |" for r in _rows(rows, columns))
    return "\n".join([header, rule, *body])


def provider_429s(run: Run) -> int:
    return sum(1 for entry in run.provider_log if entry.status == 429)
