"""Config as code: the YAML file that `manage.py quota apply` writes and `quota export` prints.

The file declares providers (with their models and prices), pools, tenants (with owners and
features) and limits; see demo/quota.yaml and the help of `manage.py quota apply`.

- Applying is idempotent and all-or-nothing: the whole file is checked and written in one
  transaction, every error is collected with its path in the file (`limits[3].amount: ...`),
  and any error rolls everything back.
- An object is identified by its slug (a feature by tenant and slug, a model by provider and
  name, a limit by scope, metric and window). A key left out of an entry means the model's
  default, not "keep what is stored": the file describes each object it names completely.
- Nothing is deleted unless asked: with `prune`, limits of the file's tenants and pools that
  the file does not declare are deleted. Providers, pools, tenants and features are never
  deleted by a file (that would cascade into ledgers and keys); retire them in the admin.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml
from django.db import transaction

from control.configfile.alerts import apply_alert_channels
from control.configfile.apply import Applier
from control.configfile.apply_limits import apply_limits
from control.configfile.export import config_export
from control.configfile.report import Change, ConfigInvalid, Report
from control.configfile.schema import Entry, Errors, parse_document

__all__ = ["Change", "ConfigInvalid", "Report", "config_apply", "config_export", "config_load"]


class _StrictLoader(yaml.SafeLoader):
    """Refuses a key given twice in one mapping, which PyYAML would silently let the last win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def config_load(text: str, *, source: str = "<config>") -> Any:
    """The YAML document in `text`; ConfigInvalid with the line and column if it is not YAML."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: builds no Python objects
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"{source}: line {mark.line + 1}, column {mark.column + 1}" if mark else source
        raise ConfigInvalid([f"{where}: {error.problem}"]) from None
    except yaml.YAMLError as error:
        raise ConfigInvalid([f"{source}: {error}"]) from None


def config_apply(document: Any, *, dry_run: bool = False, prune: bool = False) -> Report:
    """Writes the config `document` (as loaded from YAML) and says what changed.

    With `dry_run`, everything is written and checked exactly as for real, then rolled back,
    so the report is what applying would do, errors included.
    """
    errors = Errors()
    entries = parse_document(document, errors)
    report = Report(dry_run=dry_run)
    with transaction.atomic():
        _write(Applier(errors, report), entries, prune=prune)
        if errors or dry_run:
            transaction.set_rollback(True)
    if errors:
        raise ConfigInvalid(errors.items)
    return report


def _write(applier: Applier, document: Mapping[str, list[Entry]], *, prune: bool) -> None:
    """The sections in the order they name each other: limits and alert channels name the
    providers, pools, tenants and features written before them."""
    applier.run(document)
    tenants, pools = _declared(document, "tenants"), _declared(document, "pools")
    apply_limits(applier, document["limits"], prune=prune, tenants=tenants, pools=pools)
    apply_alert_channels(applier, document["alert_channels"], prune=prune, tenants=tenants)


def _declared(document: Mapping[str, list[Entry]], section: str) -> set[str]:
    """The slugs of a section's entries: `prune` only touches what the file speaks for."""
    return {e.data["slug"] for e in document[section] if "slug" in e.data}
