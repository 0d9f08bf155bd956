"""How much Redis each request costs.

Two counts per scenario. Round trips: the commands clients send, seen with MONITOR over a
short sample of sequential requests (MONITOR marks the commands a script runs as `lua`, so
those are left out). Work: INFO commandstats deltas over the measured run, which include the
commands run inside scripts; EVALSHA itself is only ever sent by a client, so its count is
exact there too. Both are server-wide, which is why the benchmark runs its own Redis.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import redis

# The harness's own probes are not the application's work.
IGNORED = {"info", "ping", "monitor", "flushall", "flushdb"}


@dataclass(frozen=True)
class CommandCounts:
    calls: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def minus(self, before: CommandCounts) -> CommandCounts:
        delta = {
            name: n - before.calls.get(name, 0)
            for name, n in self.calls.items()
            if n != before.calls.get(name, 0)
        }
        return CommandCounts(calls=delta)

    def per(self, requests: int) -> dict[str, float]:
        if not requests:
            return {}
        ordered = sorted(self.calls.items(), key=lambda item: -item[1])
        return {name: n / requests for name, n in ordered}


def command_counts(client: redis.Redis) -> CommandCounts:
    stats = client.info("commandstats")
    calls = {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name.removeprefix("cmdstat_") not in IGNORED
    }
    return CommandCounts(calls=calls)


def wait_quiet(client: redis.Redis, timeout_s: float = 15.0) -> None:
    """Waits until Redis serves nothing but this probe: the server still answers requests a
    load generator left in flight when it stopped, and those belong to no run."""
    deadline = time.monotonic() + timeout_s
    last = client.info("stats")["total_commands_processed"]
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = client.info("stats")["total_commands_processed"]
        if now - last <= 1:
            return
        last = now


def round_trips(client: redis.Redis, send: Callable[[], int]) -> tuple[CommandCounts, int]:
    """The commands clients sent to Redis while `send()` ran, and how many requests `send()`
    says it made; script-internal commands are not counted."""
    seen: Counter[str] = Counter()
    ready, stop = threading.Event(), threading.Event()
    watcher = threading.Thread(target=_watch, args=(client, seen, ready, stop), daemon=True)
    watcher.start()
    ready.wait(5)
    requests = send()
    stop.set()
    client.ping()  # wakes the watcher so it sees the stop
    watcher.join(5)
    return CommandCounts(calls=dict(seen)), requests


def _watch(
    client: redis.Redis, seen: Counter[str], ready: threading.Event, stop: threading.Event
) -> None:
    with client.monitor() as monitor:
        ready.set()
        while not stop.is_set():
            command = monitor.next_command()
            if command.get("client_type") == "lua":
                continue
            name = str(command["command"]).split(" ", 1)[0].lower()
            if name not in IGNORED:
                seen[name] += 1
