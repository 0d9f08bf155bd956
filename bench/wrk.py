"""Closed-loop load with wrk: a fixed number of connections, each sending as fast as answered."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.results import LoadResult

LUA_DIR = Path(__file__).parent / "wrk"


@dataclass(frozen=True)
class WrkOptions:
    threads: int
    connections: int
    timeout_s: int = 5


def wrk_require() -> str:
    """The wrk binary; installs Debian's package when missing and allowed (root with apt)."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk is missing: installing Debian's package", file=sys.stderr)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
        found = shutil.which("wrk")
    if not found:
        sys.exit("bench needs wrk (Debian: apt-get install wrk)")
    return found


def wrk_run(
    *,
    url: str,
    script: str,
    seconds: float,
    options: WrkOptions,
    env: dict[str, str],
) -> LoadResult:
    command = [
        wrk_require(),
        f"-t{options.threads}",
        f"-c{options.connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={options.timeout_s}s",
        "-s",
        str(LUA_DIR / script),
        url,
    ]
    env = {**os.environ, **env, "BENCH_LUA_DIR": str(LUA_DIR)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return _parse(done.stdout)


def _parse(stdout: str) -> LoadResult:
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{stdout}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    return LoadResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=sum(data["errors"].values()),
        counters=data["counters"],
    )
