"""gunicorn's settings for this app (`gunicorn --config python:config.gunicorn`), used by
bin/run and by the benchmark.

A sync worker serves one connection at a time and blocks reading it. A client that opens a
connection before it has anything to send (a pool warming up, a load balancer's early
connect, an open-loop load generator) would hold that worker idle while requests on other
connections wait behind it. With TCP_DEFER_ACCEPT the kernel hands a connection to `accept()`
only once its first bytes have arrived, so a worker no longer waits on a connection whose
request is not yet on its way. A client still silent after DEFER_ACCEPT_SECONDS is handed over
anyway (Linux accepts it on its next packet) and then holds a sync worker as before, until it
sends or gunicorn's --timeout ends the worker; so does a client that sends its request
slowly. A buffering proxy in front of the sync workers is the cure for those.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

DEFER_ACCEPT_SECONDS = 30


def defer_accept(sock: socket.socket) -> bool:
    """Sets TCP_DEFER_ACCEPT on a listening TCP socket; False where it does not apply (a Unix
    socket, or a platform without the option)."""
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    sock.setsockopt(socket.IPPROTO_TCP, option, DEFER_ACCEPT_SECONDS)
    return True


def post_fork(server: Any, worker: Any) -> None:
    """gunicorn's hook in each new worker, whose `sockets` are the listeners it accepts on
    (the arbiter's, or its own with --reuse-port); setting the option again is harmless."""
    for listener in worker.sockets:
        defer_accept(listener.sock)


def child_exit(server: Any, worker: Any) -> None:
    """A worker that exits leaves its metric files to the others (prometheus-client's
    multiprocess mode): its counters still count, its live gauges no longer do."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def worker_exit(server: Any, worker: Any) -> None:
    """A worker leaving gracefully (a deploy, --max-requests) writes the degraded-mode events
    its spool still owes the ledger, if the store answers; what it cannot write is logged."""
    from quotas.degraded import spool_drain, spool_size
    from quotas.store import get_engine

    if spool_size():
        spool_drain(get_engine())
    if spool_size():
        logging.getLogger("quotas.degraded").error(
            "a worker exits with %d degraded events the store did not take", spool_size()
        )
