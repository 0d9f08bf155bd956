"""The one table the benchmark prints, and the targets it is held to."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

from bench.redisstats import CommandCounts
from bench.results import LoadResult


@dataclass(frozen=True)
class Row:
    name: str
    result: LoadResult
    work: CommandCounts  # INFO commandstats delta over the run, script-internal calls included
    trips: dict[str, float] = field(default_factory=dict)  # client commands per request
    cpu_ms: tuple[float, float] = (0.0, 0.0)  # CPU per request: the app's, Redis's
    closed_loop: bool = True

    def calls_per_request(self) -> float | None:
        return sum(self.trips.values()) if self.trips else None

    def evalsha_per_request(self) -> float:
        return self.work.per(self.result.requests).get("evalsha", 0.0)

    def work_per_request(self) -> float:
        return self.work.total / self.result.requests if self.result.requests else 0.0


HEADER = (
    f"{'scenario':<34} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
    f"{'redis calls':>11} {'evalsha':>7} {'cmds':>5} {'app cpu ms':>10} {'redis cpu ms':>12} "
    f"{'x bare':>6} {'x ratelimit':>11}"
)
LEGEND = (
    "Per request: redis calls = commands the app sent (MONITOR sample); evalsha, cmds = "
    "EVALSHA and all commands Redis ran, scripts' included (INFO commandstats); app cpu, "
    "redis cpu = CPU time of gunicorn's processes and of Redis. x bare, x ratelimit: req/s "
    "ratios."
)


def _ratio(row: Row, base: Row | None) -> str:
    if base is None or not row.closed_loop or not base.result.rps:
        return "-"
    return f"{row.result.rps / base.result.rps:.2f}"


def _row_line(row: Row, bare: Row | None, ratelimited: Row | None) -> str:
    r, calls = row.result, row.calls_per_request()
    app_ms, redis_ms = row.cpu_ms
    return (
        f"{row.name:<34} {r.rps:>7,.0f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.errors:>6} "
        f"{'-' if calls is None else f'{calls:.2f}':>11} {row.evalsha_per_request():>7.2f} "
        f"{row.work_per_request():>5.1f} {app_ms:>10.2f} {redis_ms:>12.3f} "
        f"{_ratio(row, bare):>6} {_ratio(row, ratelimited):>11}"
    )


def table(rows: list[Row], bare: Row | None, ratelimited: Row | None) -> str:
    lines = [HEADER, "-" * len(HEADER)]
    lines.extend(_row_line(row, bare, ratelimited) for row in rows)
    return "\n".join([*lines, "", textwrap.fill(LEGEND, width=100)])


def redis_breakdown(rows: list[Row]) -> str:
    lines = ["Redis commands per request: sent by the app | run by Redis (scripts included)"]
    for row in rows:
        if not row.closed_loop:
            continue
        sent = ", ".join(f"{name} {n:.2f}" for name, n in row.trips.items() if n >= 0.005)
        per = row.work.per(row.result.requests)
        run = ", ".join(f"{name} {n:.2f}" for name, n in per.items() if n >= 0.005)
        lines.append(f"  {row.name:<34} {sent or 'none'} | {run or 'none'}")
    return "\n".join(lines)


def rounds_text(rounds: dict[str, list[Row]], bare: str, ratelimited: str) -> str:
    """Every round's requests/s and its ratios to the same round's baselines."""
    lines = ["Peak rounds: req/s (x bare, x ratelimit of the same round); the table has the median"]
    bases = (rounds.get(bare, []), rounds.get(ratelimited, []))
    for name, rows in rounds.items():
        cells = []
        for n, row in enumerate(rows):
            ratios = [
                f"{row.result.rps / base[n].result.rps:.2f}"
                if n < len(base) and base[n].result.rps
                else "-"
                for base in bases
            ]
            cells.append(f"{row.result.rps:>6,.0f} ({', '.join(ratios)})")
        lines.append(f"  {name:<34} " + "  ".join(cells))
    return "\n".join(lines)


@dataclass(frozen=True)
class Check:
    claim: str
    measured: str
    ok: bool

    def line(self) -> str:
        return f"  [{'PASS' if self.ok else 'FAIL'}] {self.claim}: {self.measured}"


def checks_text(checks: list[Check]) -> str:
    return "\n".join(["Targets:", *(c.line() for c in checks)])
