"""CPU time, read from /proc (Linux): what a run cost the server and Redis, whatever else the
machine was doing, and how busy the machine was before a run."""

from __future__ import annotations

import os
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(stat: Path) -> list[str] | None:
    try:
        text = stat.read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU of every live process in a process group."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields is not None and int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / TICK


def machine_busy(seconds: float = 1.0) -> float:
    """Share of all cores busy over `seconds`."""

    def sample() -> tuple[int, int]:
        fields = [int(n) for n in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)
