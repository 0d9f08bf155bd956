"""The brownout scenario's table, its targets, its chart, and `python -m sim --brownout`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: the chart is a file

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from sim.brownout import Brownout, BrownoutRun, simulate
from sim.chart import COLOURS, per_second, smooth
from sim.report import percentile
from sim.traffic import BATCH, CHAT


@dataclass(frozen=True)
class Summary:
    run: str
    amplification: float  # provider attempts per logical call
    provider_429s: int
    seen_5xx: int  # provider 5xx that reached the callers
    wasted_tokens: int  # sent on attempts that got no answer (429 or 5xx)
    goodput: float  # tokens answered per simulated minute, after the warm-up
    chat_kept: float  # chat's goodput in the brownout over before it
    batch_kept: float
    chat_p50: float  # chat's wait, s (real), after the warm-up
    chat_p95_before: float
    chat_p95_during: float
    chat_gave_up: int
    failed_over: int  # chat calls answered by pool B


def tokens_per_minute(run: BrownoutRun, feature: str | None, start: float, end: float) -> float:
    """Tokens answered per simulated minute between two real times."""
    served = sum(
        a.tokens
        for a in run.answers
        if a.status == 200 and start <= a.at < end and feature in (None, a.feature)
    )
    return served / (end - start) * run.brownout.minute_s if end > start else 0.0


def kept(run: BrownoutRun, feature: str) -> float:
    start, end = run.brownout.window
    before = tokens_per_minute(run, feature, run.brownout.traffic.warmup, start)
    return tokens_per_minute(run, feature, start, end) / before if before else 0.0


def chat_waits(run: BrownoutRun, start: float, end: float) -> list[float]:
    patience = run.brownout.traffic.chat_patience
    return [c.wait(patience) for c in run.calls if c.feature == CHAT and start <= c.wanted < end]


def summarise(run: BrownoutRun) -> Summary:
    b = run.brownout
    start, end = b.window
    warmup = b.traffic.warmup
    chats = [c for c in run.calls if c.feature == CHAT]
    return Summary(
        run=run.name,
        amplification=len(run.answers) / max(1, len(run.calls)),
        provider_429s=sum(1 for a in run.answers if a.status == 429),
        seen_5xx=sum(c.provider_5xx for c in run.calls),
        wasted_tokens=sum(a.tokens for a in run.answers if a.status != 200),
        goodput=tokens_per_minute(run, None, warmup, run.seconds),
        chat_kept=kept(run, CHAT),
        batch_kept=kept(run, BATCH),
        chat_p50=percentile(chat_waits(run, warmup, run.seconds), 0.5),
        chat_p95_before=percentile(chat_waits(run, warmup, start), 0.95),
        chat_p95_during=percentile(chat_waits(run, start, end), 0.95),
        chat_gave_up=sum(1 for c in chats if not c.answered),
        failed_over=sum(1 for c in chats if c.answered and c.failed_over),
    )


COLUMNS = (
    ("run", "run", "{}"),
    ("attempts/call", "amplification", "{:.2f}"),
    ("provider 429s", "provider_429s", "{:,}"),
    ("5xx seen", "seen_5xx", "{:,}"),
    ("tokens wasted", "wasted_tokens", "{:,}"),
    ("goodput tok/min", "goodput", "{:,.0f}"),
    ("chat kept", "chat_kept", "{:.0%}"),
    ("batch kept", "batch_kept", "{:.0%}"),
    ("chat p50 s", "chat_p50", "{:.3f}"),
    ("chat p95 before s", "chat_p95_before", "{:.3f}"),
    ("chat p95 during s", "chat_p95_during", "{:.3f}"),
    ("chat gave up", "chat_gave_up", "{:,}"),
    ("chat failed over", "failed_over", "{:,}"),
)


def cells(rows: list[Summary]) -> list[list[str]]:
    return [[fmt.format(getattr(row, attr)) for _, attr, fmt in COLUMNS] for row in rows]


def table(rows: list[Summary]) -> str:
    """Plain text, aligned, for the terminal."""
    lines = [[title for title, _, _ in COLUMNS], *cells(rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    text = [
        "  ".join(
            [line[0].ljust(widths[0])]
            + [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]
        )
        for line in lines
    ]
    return "\n".join([text[0], "-" * len(text[0]), *text[1:]])


def markdown(rows: list[Summary]) -> str:
    header = "| " + " | ".join(title for title, _, _ in COLUMNS) + " |"
    rule = "| --- |" + " ---: |" * (len(COLUMNS) - 1)
    return "\n".join([header, rule, *("| " + " | ".join(r) + " |" for r in cells(rows))])


@dataclass(frozen=True)
class Target:
    what: str
    met: bool | None  # None: cannot be told
    figure: str


def targets(static: Summary, adaptive: Summary) -> list[Target]:
    """The issue's targets for the adaptive run."""
    fewer = 1 - adaptive.provider_429s / static.provider_429s if static.provider_429s else 0.0
    ratio = adaptive.chat_p95_during / adaptive.chat_p95_before if adaptive.chat_p95_before else 0.0
    return [
        Target(
            "attempts per call <= 1.1",
            adaptive.amplification <= 1.1,
            f"{adaptive.amplification:.2f}",
        ),
        Target(
            "provider 429s at least 80% fewer than static",
            # with none in the static run there is nothing to be fewer than: say so
            fewer >= 0.8 if static.provider_429s else None,
            f"{adaptive.provider_429s} vs {static.provider_429s}"
            + (f" ({fewer:.0%} fewer)" if static.provider_429s else ": the static run got none"),
        ),
        Target(
            "chat p95 wait in the brownout within 1.5x of before",
            adaptive.chat_p95_during <= 1.5 * adaptive.chat_p95_before,
            f"{adaptive.chat_p95_during:.3f} s vs {adaptive.chat_p95_before:.3f} s ({ratio:.1f}x)",
        ),
        Target(
            "the batch job, not chat, absorbs the loss",
            adaptive.batch_kept < adaptive.chat_kept and adaptive.chat_kept >= 0.9,
            f"chat kept {adaptive.chat_kept:.0%}, batch kept {adaptive.batch_kept:.0%}",
        ),
    ]


VERDICTS = {True: "met   ", False: "MISSED", None: "n/a   "}


def targets_text(rows: list[Summary]) -> str:
    by_run = {row.run: row for row in rows}
    return "\n".join(
        f"{VERDICTS[t.met]}  {t.what}: {t.figure}"
        for t in targets(by_run["static"], by_run["adaptive"])
    )


def _shade(ax: Axes, run: BrownoutRun) -> None:
    start, end = run.brownout.window
    ax.axvspan(start, end, color="grey", alpha=0.12, label="capacity 40%")
    weather = run.brownout.weather()
    ax.axvspan(weather.errors_from, weather.errors_to, color="red", alpha=0.12, label="30% 5xx")


def _served(ax: Axes, run: BrownoutRun) -> None:
    for feature in (CHAT, BATCH):
        served = [
            (a.at, float(a.tokens)) for a in run.answers if a.status == 200 and a.feature == feature
        ]
        ax.plot(smooth(per_second(served, run.seconds)), label=feature, color=COLOURS[feature])
    _shade(ax, run)
    ax.set_title(f"{run.name}: tokens answered per second (3 s mean)")
    ax.set_xlabel(f"seconds (one simulated minute = {run.brownout.minute_s:g} s)")
    ax.set_ylabel("tokens / s")
    ax.legend(loc="upper right", fontsize="small")


def _waits(ax: Axes, run: BrownoutRun) -> None:
    patience = run.brownout.traffic.chat_patience
    chats = [c for c in run.calls if c.feature == CHAT]
    ax.scatter(
        [c.wanted for c in chats],
        [c.wait(patience) for c in chats],
        s=8,
        color=COLOURS[CHAT],
        label="chat wait",
    )
    _shade(ax, run)
    ax.set_ylim(0, patience * 1.1)
    ax.set_title(f"{run.name}: chat waits and provider 429s")
    ax.set_xlabel("seconds")
    ax.set_ylabel("chat wait, s")
    throttled = per_second([(a.at, 1.0) for a in run.answers if a.status == 429], run.seconds)
    twin = ax.twinx()
    twin.plot(throttled, color="black", linewidth=0.8, label="provider 429s / s")
    twin.set_ylabel("provider 429s / s")
    twin.set_ylim(0, max(1.0, *throttled) * 1.1)
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = twin.get_legend_handles_labels()
    ax.legend(handles + more, labels + more_labels, loc="upper left", fontsize="small")


def chart(runs: list[BrownoutRun], path: Path) -> Path:
    figure, axes = plt.subplots(len(runs), 2, figsize=(13, 3.8 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs, strict=True):
        _served(row[0], run)
        _waits(row[1], run)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def main(quota_url: str, headers: str, chart_path: Path, markdown_path: str | None) -> None:
    """`headers`: whether the provider's rate-limit headers show the drop ("visible") or
    state the account's tier throughout ("hidden")."""
    brownout = Brownout(visible=headers == "visible")
    print(
        f"three runs of {brownout.traffic.seconds:g} s (a simulated minute is "
        f"{brownout.minute_s:g} s; the provider's headers {headers}) ...",
        flush=True,
    )
    runs = simulate(quota_url, brownout)
    rows = [summarise(run) for run in runs]
    print(table(rows))
    print(targets_text(rows))
    print(f"chart: {chart(runs, chart_path)}")
    if markdown_path:
        Path(markdown_path).write_text(
            markdown(rows) + "\n\n" + targets_text(rows) + "\n", encoding="utf-8"
        )
        print(f"table: {markdown_path}")
