"""What an apply did (or, with --dry-run, would do), object by object, and why it failed."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

ACTIONS = ("created", "updated", "unchanged", "deleted")


class ConfigInvalid(Exception):
    """The file was refused; nothing was written. `errors` holds every `path: message`."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(f"{len(errors)} error(s)")
        self.errors = errors


@dataclass(frozen=True)
class Change:
    action: str  # one of ACTIONS
    kind: str  # provider, model, pool, owner, tenant, feature, limit
    label: str
    fields: tuple[str, ...] = ()  # for an update: the keys whose value changed

    def render(self) -> str:
        detail = f" ({', '.join(self.fields)})" if self.fields else ""
        return f"{self.action:<9}  {self.kind} {self.label}{detail}"


@dataclass
class Report:
    dry_run: bool = False
    changes: list[Change] = field(default_factory=list)

    def add(self, change: Change) -> None:
        self.changes.append(change)

    def count(self, action: str) -> int:
        return Counter(c.action for c in self.changes)[action]

    def totals(self) -> str:
        counts = ", ".join(f"{self.count(action)} {action}" for action in ACTIONS)
        return f"{counts} (dry run: nothing was written)" if self.dry_run else counts

    def render(self) -> str:
        return "\n".join([*(c.render() for c in self.changes), self.totals()])
