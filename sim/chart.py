"""The chart over time: per run, the tokens the provider served each feature, and how long
people waited for chat next to the provider's 429s."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: the chart is a file

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from sim.run import Run
from sim.traffic import BATCH, CHAT

COLOURS = {CHAT: "tab:blue", BATCH: "tab:orange"}


def per_second(times_and_values: list[tuple[float, float]], seconds: float) -> list[float]:
    bins = [0.0] * max(1, math.ceil(seconds))
    for at, value in times_and_values:
        bins[min(len(bins) - 1, int(at))] += value
    return bins


def smooth(values: list[float], width: int = 3) -> list[float]:
    """Trailing mean: calls end in bursts, a per-second line would be mostly noise."""
    return [
        sum(values[max(0, i - width + 1) : i + 1]) / min(width, i + 1) for i in range(len(values))
    ]


def _tokens(ax: Axes, run: Run) -> None:
    for feature in (CHAT, BATCH):
        served = [
            (e.at, float(e.tokens))
            for e in run.provider_log
            if e.status == 200 and e.feature == feature
        ]
        ax.plot(smooth(per_second(served, run.seconds)), label=feature, color=COLOURS[feature])
    ax.axhline(run.scenario.tpm / 60, color="grey", linestyle="--", label="provider TPM / 60")
    ax.axvspan(0, run.scenario.warmup, color="grey", alpha=0.15, label="warm-up (not measured)")
    # the warm-up's burst (the full bucket) would flatten the steady state: clip it
    ax.set_ylim(0, run.scenario.tpm / 60 * 2.5)
    ax.set_title(f"{run.name}: tokens served per second (3 s mean)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("tokens / s")
    ax.legend(loc="upper right", fontsize="small")


def _waits(ax: Axes, run: Run) -> None:
    chats = [c for c in run.calls if c.feature == CHAT]
    patience = run.scenario.chat_patience
    answered = [c for c in chats if not c.gave_up]
    ax.scatter(
        [c.wanted for c in answered],
        [c.wait(0) for c in answered],
        s=10,
        color=COLOURS[CHAT],
        label="chat wait (answered)",
    )
    left = [c.wanted for c in chats if c.gave_up]
    ax.scatter(left, [patience] * len(left), s=18, marker="x", color="red", label="chat gave up")
    ax.set_ylim(0, patience * 1.1)
    ax.set_title(f"{run.name}: chat waits and upstream 429s")
    ax.set_xlabel("seconds")
    ax.set_ylabel("chat wait before admission, s")
    throttled = [(e.at, 1.0) for e in run.provider_log if e.status == 429]
    twin = ax.twinx()
    twin.plot(
        per_second(throttled, run.seconds), color="black", linewidth=0.8, label="upstream 429s / s"
    )
    twin.set_ylabel("upstream 429s / s")
    twin.set_ylim(bottom=0, top=max(1.0, *per_second(throttled, run.seconds)) * 1.1)
    handles = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], loc="upper right", fontsize="small")


def chart(runs: list[Run], path: Path) -> Path:
    figure, axes = plt.subplots(len(runs), 2, figsize=(13, 4.2 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs, strict=True):
        _tokens(row[0], run)
        _waits(row[1], run)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
