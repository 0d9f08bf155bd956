"""`python -m sim`: the simulator's command line (`__main__.py` sets Django up first)."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.servers.basehttp import (
    ThreadedWSGIServer,
    WSGIRequestHandler,
    get_internal_wsgi_application,
)

from quotas.store import get_redis
from sim import brownout_report
from sim.chart import chart
from sim.report import markdown, provider_429s, summaries, table
from sim.run import simulate
from sim.storm import Storm, storm_runs
from sim.storm_report import RUN_COLUMNS, WAIT_COLUMNS, class_waits, run_summary, storm_chart
from sim.traffic import Scenario

DESCRIPTION = """\
Replay the starvation of a shared provider account on the real stack: a fake provider with its
own TPM and RPM buckets, an interactive chat feature and a flooding batch feature sharing one
pool, both calling through the SDK's wrap_openai. The same traffic runs twice, without the
platform's limits and with them; a table per feature is printed and a chart written.

It writes a tenant "noisy-sim" with new pools and keys to the database and usage events to
Redis: run it against a database and a Redis database of its own, e.g.
  REDIS_URL=redis://127.0.0.1:6379/3 DATABASE_URL=sqlite:///var/simulate.sqlite3 \\
    python -m sim
"""


CHART = "var/simulation.png"


def parser_create() -> argparse.ArgumentParser:
    default = Scenario()
    parser = argparse.ArgumentParser(
        prog="python -m sim",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=default.seconds, help="per run")
    parser.add_argument("--tpm", type=int, default=default.tpm, help="the provider's TPM")
    parser.add_argument("--rpm", type=int, default=default.rpm, help="the provider's RPM")
    parser.add_argument("--batch-workers", type=int, default=default.batch_workers)
    parser.add_argument("--chat-rate", type=float, default=default.chat_rate, help="per second")
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--chart", default=CHART, help="where to write the PNG")
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    parser.add_argument(
        "--storm",
        action="store_true",
        help="run the retry storm instead (sim/storm.py): no platform, refusals and retries, "
        "scheduled admission; --chart and --markdown then write its chart and tables",
    )
    parser.add_argument(
        "--brownout",
        nargs="?",
        const="hidden",
        choices=("hidden", "visible"),
        help="the brownout scenario instead; 'visible': the provider's headers show the drop",
    )
    parser.add_argument(
        "--allow-redis-db0",
        action="store_true",
        help="run even though REDIS_URL is database 0 (normally the real data)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    options = parser_create().parse_args(argv)
    _refuse_shared_redis(options.allow_redis_db0)
    call_command("migrate", verbosity=0, interactive=False)  # a fresh throwaway database
    if options.storm:
        storm_main(options)
        return
    if options.brownout:
        with api_server() as url:
            return brownout_report.main(
                url, options.brownout, Path(options.chart), options.markdown
            )
    scenario = Scenario(
        seconds=options.seconds,
        tpm=options.tpm,
        rpm=options.rpm,
        batch_workers=options.batch_workers,
        chat_rate=options.chat_rate,
        seed=options.seed,
    )
    print(f"two runs of {scenario.seconds:g} s each ...", flush=True)
    with api_server() as url:
        runs = simulate(url, scenario)
    rows = summaries(runs)
    print(table(rows))
    for run in runs:
        print(f"provider 429s {run.name}: {provider_429s(run)}")
    print(f"chart: {chart(runs, Path(options.chart))}")
    if options.markdown:
        Path(options.markdown).write_text(markdown(rows) + "\n", encoding="utf-8")
        print(f"table: {options.markdown}")


def storm_main(options: argparse.Namespace) -> None:
    storm = Storm(seed=options.seed)
    logging.getLogger("quotaclient").setLevel(logging.WARNING)  # a line per retry otherwise
    print(f"three runs of {storm.callers} callers waking together ...", flush=True)
    with api_server() as url:
        runs = storm_runs(url, storm)
    per_run = [run_summary(run) for run in runs]
    per_class = [row for run in runs for row in class_waits(run)]
    print(table(per_run, RUN_COLUMNS))
    print()
    print(table(per_class, WAIT_COLUMNS))
    chart_path = Path(options.chart).with_name("storm.png") if options.chart == CHART else None
    print(f"chart: {storm_chart(runs, chart_path or Path(options.chart))}")
    if options.markdown:
        text = markdown(per_run, RUN_COLUMNS) + "\n\n" + markdown(per_class, WAIT_COLUMNS)
        Path(options.markdown).write_text(text + "\n", encoding="utf-8")
        print(f"tables: {options.markdown}")


def _refuse_shared_redis(allowed: bool) -> None:
    index = get_redis().connection_pool.connection_kwargs.get("db", 0)
    if index == 0 and not allowed:
        sys.exit(
            f"REDIS_URL ({settings.REDIS_URL}) is database 0: give the simulation a Redis "
            "database of its own (e.g. redis://127.0.0.1:6379/3), or pass --allow-redis-db0."
        )


def quiet_logs() -> None:
    """A line per call or per refusal would bury the table: the refusals are the point."""
    for client in ("httpx", "httpx2"):  # openai sends through httpx2
        logging.getLogger(client).setLevel(logging.WARNING)
    logging.getLogger("django.request").setLevel(logging.ERROR)


class QuietHandler(WSGIRequestHandler):
    # Without Nagle's delay a keep-alive request takes 1 ms, not 40 (headers and body are
    # written separately).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the simulator's refusals are expected; thousands of lines would hide the table


@contextmanager
def api_server() -> Iterator[str]:
    """The real API (this project's WSGI app) on a free local port, in threads."""
    server = ThreadedWSGIServer(("127.0.0.1", 0), QuietHandler, allow_reuse_address=False)
    server.set_app(get_internal_wsgi_application())
    quiet_logs()  # after the app: building it sets logging up again
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host!s}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
