"""A client process for tests/quotas/test_cluster_failover.py: it reserves and commits through
HTTP, in a loop, for one tenant on one pool, alternating between the API servers, until a stop
file appears, and writes what each call answered as one JSON line:

    {"op": "reserve" | "commit", "rid": ..., "status": ..., "degraded": ...,
     "started": ..., "ended": ..., "retry_after": ..., "error": <the body of a 4xx or 5xx>}

`started` and `ended` are the monotonic clock, which every process of the machine shares. A
commit answered 503 (or a refused connection) is tried again once between two reservations
(which go on meanwhile), every attempt a line of its own, until another answer or for
RETRY_SECONDS; those still pending at the stop are tried until then. Standard library only:
it runs without Django.

    python -m tests.quotas.failover_client PORTS KEY MODEL POOL OUT STOP
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TextIO

RETRY_SECONDS = 30.0
PAUSE = 0.02  # between two reservations of one client


def call(port: int, path: str, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], str]:
    """Status, JSON body and Retry-After of a POST; status 0 when the connection failed."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        method="POST",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, _json(answer.read()), answer.headers.get("Retry-After", "")
    except urllib.error.HTTPError as error:
        return error.code, _json(error.read()), error.headers.get("Retry-After", "")
    except (ConnectionError, urllib.error.URLError, TimeoutError):
        return 0, {}, ""


def _json(body: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(body)
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def drive(ports: list[int], key: str, model: str, pool: str, out: TextIO, stop: Path) -> None:
    turns = itertools.cycle(ports)

    def record(op: str, rid: str | None, started: float, answer: tuple[int, Any, str]) -> None:
        status, body, retry_after = answer
        line = {
            "op": op,
            "rid": rid,
            "status": status,
            "degraded": bool(body.get("degraded")),
            "started": started,
            "ended": time.monotonic(),
            "retry_after": retry_after,
            "error": body if status >= 400 else None,
        }
        out.write(json.dumps(line) + "\n")
        out.flush()

    reserve = {"feature": "chat", "model": model, "pool": pool, "input_tokens": 100}
    reserve |= {"max_output_tokens": 100, "ttl_seconds": 3600}
    usage = {"input_tokens": 100, "output_tokens": 50}
    pending: dict[str, float] = {}  # commits answered 503: rid -> when to give up

    def commit(rid: str) -> None:
        started = time.monotonic()
        answer = call(next(turns), f"/api/v1/reservations/{rid}/commit", key, usage)
        record("commit", rid, started, answer)
        if answer[0] not in (0, 503):
            pending.pop(rid, None)
        elif rid not in pending:
            pending[rid] = started + RETRY_SECONDS
        elif time.monotonic() > pending[rid]:
            del pending[rid]

    while not stop.exists():
        for rid in list(pending):  # once each, between two reservations
            commit(rid)
        started = time.monotonic()
        answer = call(next(turns), "/api/v1/reservations", key, reserve)
        granted = answer[1].get("id") if answer[0] == 201 else None
        record("reserve", granted, started, answer)
        if granted is not None:
            commit(granted)
        time.sleep(PAUSE)
    while pending:
        for rid in list(pending):
            commit(rid)
        time.sleep(0.1)


def main(argv: list[str]) -> None:
    ports, key, model, pool, out, stop = argv
    with open(out, "a") as stream:
        drive([int(p) for p in ports.split(",")], key, model, pool, stream, Path(stop))


if __name__ == "__main__":
    main(sys.argv[1:])
