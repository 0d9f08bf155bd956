"""`manage.py quota SUBCOMMAND`: config as code and API keys.

Each subcommand is a pair of small functions: `add_<name>(subparsers)` declares its
arguments and sets `handler`; the handler does the work through services and prints. To add
a subcommand, write the pair and list `add_<name>` in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TypeAlias

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.urls import reverse

from control.configfile import ConfigInvalid, config_apply, config_export, config_load
from ledger.commands import (
    add_drift,
    add_import_usage,
    add_ingest,
    add_rebuild,
    add_reconcile,
)
from quotas.keys import api_key_create, api_key_revoke, api_key_split
from quotas.models import ApiKey
from tenants.models import Feature, Tenant

Subparsers: TypeAlias = "argparse._SubParsersAction[CommandParser]"
Handler = Callable[["Command", dict[str, Any]], None]

APPLY_DESCRIPTION = """\
Create or update, idempotently, what FILE declares: providers with their models and prices,
pools, tenants with owners and features, and limits. The whole file is checked first, in one
transaction: if anything is wrong, every error is printed with its path in the file
(e.g. limits[3].amount) and nothing is written.

Objects are identified by slug (a feature by tenant and slug, a model by provider and name, a
limit by its scope, metric and window); a key left out of an entry means its default.
Owners are e-mail addresses; a missing owner becomes a staff user without a password, who
sets one from the admin's login page ("Forgotten your login credentials?").

Nothing is deleted unless you pass --prune, and then only limits: those of the file's
tenants and pools that the file no longer declares. Providers, pools, tenants and features
are never deleted by a file; retire them in the admin.
"""


class Command(BaseCommand):
    help = "Config as code and API keys: apply, export, key create|revoke|list."

    def add_arguments(self, parser: CommandParser) -> None:
        subparsers = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
        for add in SUBCOMMANDS:
            add(subparsers)

    def handle(self, *args: Any, **options: Any) -> None:
        handler: Handler = options["handler"]
        handler(self, options)


# apply


def add_apply(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "apply",
        help="create or update what a config file declares",
        description=APPLY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", help="the YAML config file, or - to read standard input")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything and print what would change, but write nothing",
    )
    parser.add_argument(
        "--prune",
        action="store_true",
        help="also delete the limits of the file's tenants and pools that it does not declare",
    )
    parser.set_defaults(handler=run_apply)


def run_apply(command: Command, options: dict[str, Any]) -> None:
    path = options["file"]
    try:
        document = config_load(_read(path), source=path)
        report = config_apply(document, dry_run=options["dry_run"], prune=options["prune"])
    except ConfigInvalid as invalid:
        for error in invalid.errors:
            command.stderr.write(error)
        count = len(invalid.errors)
        raise CommandError(
            f"{count} error{'s' if count != 1 else ''} in {path}; nothing was written."
        ) from None
    if not options["dry_run"] and any(
        c.kind == "owner" and c.action == "created" for c in report.changes
    ):
        reset = settings.SITE_URL.rstrip("/") + reverse("admin_password_reset")
        command.stdout.write(f"New owners set their password by e-mail at {reset}")
    command.stdout.write(report.render())  # the totals last, for scripts


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except OSError as error:
        raise CommandError(f"cannot read {path}: {error.strerror}") from None


# export


def add_export(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="print the stored config as a config file (apply it to get the same)"
    )
    parser.set_defaults(handler=run_export)


def run_export(command: Command, options: dict[str, Any]) -> None:
    command.stdout.write(config_export(), ending="")


# key create | revoke | list


def add_key(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("key", help="API keys: create, revoke, list")
    actions = parser.add_subparsers(dest="key_action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a key and print it, this once only")
    create.add_argument("--tenant", required=True, help="the tenant's slug")
    create.add_argument(
        "--feature",
        action="append",
        dest="features",
        metavar="FEATURE",
        help="narrow the key to this feature of the tenant (repeat for several)",
    )
    create.add_argument("--name", default="", help="what the key is for, e.g. 'chat backend'")
    create.set_defaults(handler=run_key_create)
    revoke = actions.add_parser("revoke", help="revoke a key: it is refused from now on")
    revoke.add_argument("prefix", help="the key's prefix (as `key list` shows it) or the key")
    revoke.set_defaults(handler=run_key_revoke)
    listing = actions.add_parser("list", help="list a tenant's keys (never their secrets)")
    listing.add_argument("--tenant", required=True, help="the tenant's slug")
    listing.set_defaults(handler=run_key_list)


def run_key_create(command: Command, options: dict[str, Any]) -> None:
    tenant = _tenant(options["tenant"])
    features = [_feature(tenant, slug) for slug in options["features"] or []]
    try:
        issued = api_key_create(tenant=tenant, features=features, name=options["name"])
    except ValidationError as error:
        raise CommandError("; ".join(error.messages)) from None
    narrowed = f" (features: {', '.join(f.slug for f in features)})" if features else ""
    # The key alone on stdout, so that it can be captured; the words go to stderr.
    command.stderr.write(
        f"API key {issued.api_key.prefix} for tenant '{tenant.slug}'{narrowed}. "
        "It is shown only this once: store it now."
    )
    command.stdout.write(issued.secret)


def run_key_revoke(command: Command, options: dict[str, Any]) -> None:
    prefix = api_key_split(options["prefix"]) or options["prefix"]
    api_key = ApiKey.objects.select_related("tenant").filter(prefix=prefix).first()
    if api_key is None:
        raise CommandError(f"no API key with prefix '{prefix}'")
    already = api_key.revoked_at is not None
    api_key_revoke(api_key=api_key)
    state = "was already revoked" if already else "revoked"
    command.stdout.write(f"API key {prefix} of tenant '{api_key.tenant.slug}' {state}.")


def run_key_list(command: Command, options: dict[str, Any]) -> None:
    tenant = _tenant(options["tenant"])
    rows = [("PREFIX", "NAME", "FEATURES", "CREATED (UTC)", "REVOKED (UTC)")]
    for key in ApiKey.objects.filter(tenant=tenant).prefetch_related("features"):
        features = ", ".join(sorted(f.slug for f in key.features.all())) or "(all)"
        created = f"{key.created_at:%Y-%m-%d %H:%M}"
        revoked = f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "-"
        rows.append((key.prefix, key.name or "-", features, created, revoked))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        command.stdout.write(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        )


def _tenant(slug: str) -> Tenant:
    tenant = Tenant.objects.filter(slug=slug).first()
    if tenant is None:
        raise CommandError(f"no tenant '{slug}'")
    return tenant


def _feature(tenant: Tenant, slug: str) -> Feature:
    feature = Feature.objects.filter(tenant=tenant, slug=slug).first()
    if feature is None:
        raise CommandError(f"no feature '{slug}' in tenant '{tenant.slug}'")
    return feature


SUBCOMMANDS: list[Callable[[Subparsers], None]] = [
    add_apply,
    add_export,
    add_key,
    add_ingest,
    add_drift,
    add_rebuild,
    add_import_usage,
    add_reconcile,
]
