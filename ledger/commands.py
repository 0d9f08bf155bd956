"""The ledger's subcommands of `manage.py quota` (listed in its SUBCOMMANDS): each an
`add_<name>(subparsers)` that declares arguments and a handler that calls a service."""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.core.management.base import CommandError, CommandParser

from ledger.provider_usage import PARSERS, ExportInvalid, provider_usage_import
from ledger.reconcile import BudgetReport, budgets_reconcile
from ledger.recovery import store_rebuild
from ledger.selectors import provider_drift
from ledger.services import usage_ingest

if TYPE_CHECKING:
    from django.core.management.base import BaseCommand

    Subparsers = argparse._SubParsersAction[CommandParser]
else:
    Subparsers = Any

REBUILD_DESCRIPTION = """\
Restore what Redis lost (a restart without persistence, FLUSHALL, a failover) from the ledger
and the configuration: the current period of every hour, day and month budget, and the leases
of held reservations with their concurrency slots. It runs by itself (a Celery task) when the
first decision finds the store lost its data; this runs it now, even on a store that did not.
It is safe to run with traffic flowing and to run twice (counters are moved by the
difference, leases only written where missing). Minute buckets need nothing: a missing bucket
is a full one and every bucket refills within its minute. Events that never reached the ledger
before Redis lost them are lost with them; with AOF every second that is at most a second of
decisions.
"""


def _table(report: BudgetReport, *, only_drift: bool) -> list[str]:
    rows = [("LIMIT", "KEY", "REDIS", "LEDGER", "DRIFT")]
    for row in report.rows:
        if only_drift and row.drift == 0:
            continue
        name = f"{row.period.limit.id} {row.period.limit.name}"
        rows.append((name, row.period.key, str(row.redis), str(row.ledger), f"{row.drift:+d}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def add_rebuild(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "rebuild",
        help="restore calendar budgets and open leases in Redis from the ledger",
        description=REBUILD_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=run_rebuild)


def run_rebuild(command: BaseCommand, options: dict[str, Any]) -> None:
    report = store_rebuild(force=True)
    assert report is not None  # forced: it always runs
    for line in _table(report, only_drift=True):
        command.stdout.write(line)
    command.stdout.write(
        f"{len(report.rows)} budgets checked, {report.repaired} moved; "
        f"{report.leases_restored} leases restored, {report.leases_present} already there."
    )


def add_drift(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "drift", help="compare Redis budget counters with the ledger (and repair them)"
    )
    parser.add_argument("--all", action="store_true", help="list budgets without drift too")
    parser.add_argument(
        "--repair", action="store_true", help="move drifted counters to the ledger's amount"
    )
    parser.set_defaults(handler=run_drift)


def run_drift(command: BaseCommand, options: dict[str, Any]) -> None:
    report = budgets_reconcile(repair=options["repair"])
    drifted = report.drifted
    if drifted or options["all"]:
        for line in _table(report, only_drift=not options["all"]):
            command.stdout.write(line)
    repaired = f"; {report.repaired} repaired" if options["repair"] else ""
    command.stdout.write(f"{len(report.rows)} budgets checked, {len(drifted)} drifted{repaired}.")


def add_ingest(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("ingest", help="drain the usage stream into the ledger now")
    parser.set_defaults(handler=run_ingest)


def run_ingest(command: BaseCommand, options: dict[str, Any]) -> None:
    report = usage_ingest()
    command.stdout.write(
        f"{report.entries} events in {report.batches} batches ({report.reclaimed} reclaimed)."
    )


def add_import_usage(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "import-usage",
        help="import a provider's usage or cost export for one pool (JSON pages or CSV)",
    )
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--pool", required=True, help="the pool (provider account) it covers")
    parser.add_argument("--source", required=True, choices=sorted(PARSERS))
    parser.set_defaults(handler=run_import_usage)


def run_import_usage(command: BaseCommand, options: dict[str, Any]) -> None:
    files = []
    for path in options["files"]:
        try:
            files.append((path, Path(path).read_text(encoding="utf-8")))
        except OSError as error:
            raise CommandError(f"cannot read {path}: {error.strerror}") from None
    try:
        days = provider_usage_import(pool=options["pool"], source=options["source"], files=files)
    except ExportInvalid as error:
        raise CommandError(str(error)) from None
    command.stdout.write(f"{len(days)} days x models imported for pool '{options['pool']}'.")


def add_reconcile(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "reconcile", help="compare imported provider usage with the ledger, per day and model"
    )
    parser.add_argument("--pool", required=True)
    parser.add_argument("--since", type=date.fromisoformat, help="first day, YYYY-MM-DD")
    parser.add_argument("--until", type=date.fromisoformat, help="last day, YYYY-MM-DD")
    parser.add_argument("--alerts", action="store_true", help="only rows above the threshold")
    parser.set_defaults(handler=run_reconcile)


def run_reconcile(command: BaseCommand, options: dict[str, Any]) -> None:
    drift = provider_drift(pool=options["pool"], since=options["since"], until=options["until"])
    rows = [("DAY", "MODEL", "METRIC", "LEDGER", "PROVIDER", "DIFF", "%", "ALERT")]
    for d in drift:
        if options["alerts"] and not d.alert:
            continue
        rows.append(
            (
                d.day.isoformat(),
                d.model,
                d.metric,
                str(d.ledger),
                str(d.provider),
                f"{d.difference:+d}",
                f"{d.ratio * 100:+.1f}",
                "ALERT" if d.alert else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        command.stdout.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    alerts = sum(d.alert for d in drift)
    command.stdout.write(f"{alerts} of {len(drift)} figures above the alert threshold.")
