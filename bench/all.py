"""Every benchmark in bench/ with one command, and one table of their headline figures.

    .venv/bin/python -m bench.all [--quick] [--only http,ledger,simulate,admin]

- http: reservation throughput and latency against the two baselines (`python -m bench`);
- ledger: ledger ingest into PostgreSQL (`python -m bench.ledger_ingest`), if present;
- simulate: the noisy-neighbour simulator (`python -m sim`), on a Redis server and
  a SQLite database of its own;
- admin: admin pages and the rollup reads with 10,000 features and 10 million rollups
  (`python -m bench.admin_pages --keep`: a load of the last 6 hours is reused), if present.

Each runs in a process of its own, through its own command line (they set Django up
differently), and prints its full report as it goes; this file only reads the figures back
from what they printed. --quick shortens every run, for a smoke test of the suite.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Figure:
    suite: str
    scenario: str
    throughput: str
    median: str = ""
    tail: str = ""
    note: str = ""


def run(command: list[str], env: dict[str, str] | None = None) -> str:
    """Runs a benchmark, echoing its output, and returns that output."""
    print(f"\n$ {' '.join(command)}", flush=True)
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    if process.wait() != 0:
        raise SystemExit(f"{command[2] if len(command) > 2 else command} failed")
    return "".join(lines)


# http


def http(quick: bool) -> list[Figure]:
    quick_args = ["--duration", "3", "--warmup", "1", "--no-fixed", "--features", "10"]
    args = [*quick_args, "--rounds", "1"] if quick else []
    output = run([sys.executable, "-m", "bench", *args])
    return http_figures(output)


def http_figures(output: str) -> list[Figure]:
    """Rows of bench.report.table: a 34-character name, then req/s, p50, p99, errors, ..."""
    lines = output.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("scenario "))
    figures = []
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        name, cells = line[:34].strip(), line[34:].split()
        figures.append(
            Figure(
                "http",
                name,
                f"{cells[0]} req/s",
                f"p50 {cells[1]} ms",
                f"p99 {cells[2]} ms",
                http_note(cells),
            )
        )
    return figures


def http_note(cells: list[str]) -> str:
    """Errors, and the ratios to the baselines where the run has them (closed-loop runs)."""
    if cells[9] == "-":
        return f"errors {cells[3]}"
    return f"errors {cells[3]}, x bare {cells[9]}, x ratelimit {cells[10]}"


# ledger


def ledger(quick: bool) -> list[Figure]:
    if not (ROOT / "bench" / "ledger_ingest.py").exists():
        return []
    args = ["--events", "20000", "--naive-events", "2000", "--seconds", "3"] if quick else []
    return ledger_figures(run([sys.executable, "-m", "bench.ledger_ingest", *args]))


def ledger_figures(output: str) -> list[Figure]:
    """Rows of bench.ledger_ingest.report: a 40-character name, then batch, events, seconds,
    events/s, x naive, events/cpu-s; and the lag line."""
    lines = output.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("ingest "))
    figures = []
    for line in lines[start + 2 :]:
        if line.startswith("target") or not line.strip():
            break
        name, cells = line[:40].strip(), line[40:].split()
        figures.append(
            Figure(
                "ledger",
                f"{name}, batch {cells[0]}",
                f"{cells[3]} events/s",
                note=f"x naive {cells[4]}, {cells[5]} events/cpu-s",
            )
        )
    lag = re.search(
        r"lag commit -> ledger row at ([\d,]+) events/s: p50 (\d+) ms, p95 (\d+)", output
    )
    if lag:
        rate, p50, p95 = lag.groups()
        figures.append(
            Figure(
                "ledger",
                "commit-to-ledger lag",
                f"{rate} events/s",
                f"p50 {p50} ms",
                f"p95 {p95} ms",
            )
        )
    return figures


# simulate


def simulate(quick: bool) -> list[Figure]:
    from bench.redisserver import redis_server_start

    redis_server = redis_server_start()  # its own server: the simulator writes usage events
    try:
        with tempfile.TemporaryDirectory() as directory:
            table = Path(directory) / "table.md"
            args = ["--seconds", "12"] if quick else []
            env = {
                "REDIS_URL": f"{redis_server.url.rstrip('/')}/1",
                "DATABASE_URL": f"sqlite:///{Path(directory) / 'simulate.sqlite3'}",
                "LOG_LEVEL": "WARNING",
            }
            run(
                [
                    sys.executable,
                    "-m",
                    "sim",
                    "--markdown",
                    str(table),
                    "--chart",
                    str(ROOT / "var" / "simulation.png"),
                    *args,
                ],
                env,
            )
            return simulate_figures(table.read_text(encoding="utf-8"))
    finally:
        redis_server.stop()


def simulate_figures(markdown: str) -> list[Figure]:
    """Rows of sim.report.markdown."""
    figures = []
    for line in markdown.splitlines()[2:]:
        run_name, feature, tokens, _, gave_up, p50, p95, refusals, upstream, truncated = [
            cell.strip() for cell in line.strip("|").split("|")
        ]
        note = f"upstream 429s {upstream}, refusals {refusals}, truncated {truncated}"
        figures.append(
            Figure(
                "simulate",
                f"{feature}, {run_name}",
                f"{tokens} tokens/min",
                f"p50 wait {p50} s",
                f"p95 wait {p95} s",
                f"{note}, gave up {gave_up}",
            )
        )
    return figures


# admin


def admin(quick: bool) -> list[Figure]:
    if not (ROOT / "bench" / "admin_pages.py").exists():
        return []
    args = ["--keep", *(["--quick"] if quick else [])]
    return admin_figures(run([sys.executable, "-m", "bench.admin_pages", *args]))


# a row of bench.admin_pages.pages_table: the page (as wide as the longest), the user (one word),
# the status, then p50, p95, max, queries, x baseline and whether the target was met, or only
# "missing" after a 404
PAGE_ROW = re.compile(
    r"^(?P<page>\S.*?)\s+(?P<user>\S+)\s+(?P<status>\d{3})\s+(?:missing|(?P<p50>\d+\.\d)\s+"
    r"(?P<p95>\d+\.\d)\s+\d+\.\d\s+(?P<queries>\d+)\s+(?P<ratio>\d+\.\d)\s+(?P<met>.*))$"
)
# a row of bench.admin_pages.reads_measure: the read's name (as wide as the longest), p50,
# p95, max, queries, rows, and a word on the target
READ_ROW = re.compile(
    r"^(?P<name>\S.*?)\s+(?P<p50>\d+\.\d)\s+(?P<p95>\d+\.\d)\s+\d+\.\d\s+"
    r"(?P<queries>\d+)\s+\d+(?P<rest>.*)$"
)


def admin_figures(output: str) -> list[Figure]:
    """Rows of bench.admin_pages.pages_table (PAGE_ROW) and of reads_measure (READ_ROW), each
    table up to its first line that is not a row, and the load line."""
    lines = output.splitlines()
    figures = []
    start = max(i for i, line in enumerate(lines) if line.startswith("page "))
    for line in lines[start + 2 :]:
        page = PAGE_ROW.match(line)
        if page is None:
            break
        name = f"{page['page']}, {page['user']}"
        if page["p50"] is None:
            figures.append(Figure("admin", name, "missing (404)"))
            continue
        note = (
            f"x login {page['ratio']}, {page['queries']} queries, "
            f"under 300 ms at p95: {page['met']}"
        )
        figures.append(
            Figure("admin", name, "", f"p50 {page['p50']} ms", f"p95 {page['p95']} ms", note)
        )
    start = max(i for i, line in enumerate(lines) if line.startswith("rollup read "))
    for line in lines[start + 2 :]:
        row = READ_ROW.match(line)
        if row is None:
            break
        word = row["rest"].strip()  # "over 100 ms", "background" or nothing
        note = f"{row['queries']} queries" + (f", {word}" if word else "")
        figures.append(
            Figure("admin", row["name"], "", f"p50 {row['p50']} ms", f"p95 {row['p95']} ms", note)
        )
    loaded = re.search(r"^load: load (\d+) s", output, re.MULTILINE)
    if loaded:
        figures.append(Figure("admin", "load (config, rollups, indexes)", f"{loaded[1]} s"))
    return figures


SUITES: dict[str, Callable[[bool], list[Figure]]] = {
    "http": http,
    "ledger": ledger,
    "simulate": simulate,
    "admin": admin,
}


def table(figures: list[Figure]) -> str:
    rows = [("suite", "scenario", "throughput", "median", "tail", "notes")]
    rows += [(f.suite, f.scenario, f.throughput, f.median, f.tail, f.note) for f in figures]
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.all", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    parser.add_argument("--only", default=",".join(SUITES), help="suites, comma-separated")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(SUITES)
    if unknown:
        parser.error(f"unknown suites: {', '.join(sorted(unknown))}")
    figures = [figure for name in chosen for figure in SUITES[name](args.quick)]
    print(f"\nAll benchmarks ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}):")
    print(table(figures))


if __name__ == "__main__":
    main()
