"""The shape of a config file: which keys each entry takes and what type each value has.

Checked before anything is looked up or written, so that a typo or a wrong type is reported
at its path (`tenants[0].timezon: unknown key ...`) instead of passing silently or surfacing
as a confusing model error. Rules about meaning (is this amount allowed?) are not here: they
live in the models and `quotas.validation`, and reach the file through the services.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from alerts.transports import TRANSPORTS
from providers.models import Pool
from quotas.models import Enforcement, Metric, Window
from tenants.models import Feature, Priority, Tenant

Coerce = Callable[[Any], Any]  # returns the value to use, or raises ValueError(message)


class Errors:
    """Every problem found in a file, each as `path: message`."""

    def __init__(self) -> None:
        self._found: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self._found.append((path, message))

    @property
    def items(self) -> list[str]:
        """In the order of the file (shape and meaning are checked in separate passes)."""
        found = sorted(self._found, key=lambda item: _file_order(item[0]))
        return [f"{path}: {message}" if path else message for path, message in found]

    def __bool__(self) -> bool:
        return bool(self._found)

    def __len__(self) -> int:
        return len(self._found)


@dataclass(frozen=True)
class Key:
    coerce: Coerce | None = None
    required: bool = False
    shape: dict[str, Key] | None = None  # a nested mapping (a limit's scope)
    each: dict[str, Key] | None = None  # a list of nested entries (a tenant's features)


@dataclass
class Entry:
    """One parsed entry: the values of its keys that passed, and whether all of them did."""

    path: str
    data: dict[str, Any] = field(default_factory=dict)
    valid: bool = True


def _show(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else repr(value)


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected text, got {_show(value)}")
    return value


def optional_text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {_show(value)}")
    return value


def number(value: Any) -> Decimal:
    # Through str(): Decimal(0.15) would carry the float's binary error into the database.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {_show(value)}")
    return Decimal(str(value))


def optional_number(value: Any) -> Decimal | None:
    return None if value is None else number(value)


def whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {_show(value)}")
    return value


def optional_whole(value: Any) -> int | None:
    return None if value is None else whole(value)


def choice(values: list[str]) -> Coerce:
    def coerce(value: Any) -> str:
        if value not in values:
            raise ValueError(f"{_show(value)} is not one of {', '.join(values)}")
        return str(value)

    return coerce


def text_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of names, got {_show(value)}")
    return value


def as_is(value: Any) -> Any:
    """For values whose rules the model states best (a pool's protect, a limit's alert_at)."""
    return value


MODEL = {
    "name": Key(text, required=True),
    "input_per_mtok": Key(number, required=True),
    "cached_input_per_mtok": Key(optional_number),
    "output_per_mtok": Key(number, required=True),
    "context_window": Key(optional_whole),
    "chars_per_token": Key(number),
}
PROVIDER = {
    "slug": Key(text, required=True),
    "name": Key(optional_text),
    "models": Key(each=MODEL),
}
POOL = {
    "slug": Key(text, required=True),
    "name": Key(optional_text),
    "provider": Key(text, required=True),
    "models": Key(text_list),
    "fail_mode": Key(choice(Pool.FailMode.values)),
    "protect": Key(as_is),
    "position": Key(whole),
    "line_minutes": Key(number),
    "backpressure": Key(as_is),
}
FEATURE = {
    "slug": Key(text, required=True),
    "name": Key(optional_text),
    "owner": Key(text, required=True),
    "priority": Key(choice(Priority.values)),
    "status": Key(choice(Feature.Status.values)),
    "pools": Key(text_list),
}
TENANT = {
    "slug": Key(text, required=True),
    "name": Key(optional_text),
    "timezone": Key(text),
    "status": Key(choice(Tenant.Status.values)),
    "owners": Key(text_list),
    "features": Key(each=FEATURE),
}
SCOPE = {name: Key(text) for name in ("tenant", "feature", "pool", "model")}
LIMIT = {
    "scope": Key(shape=SCOPE, required=True),
    "metric": Key(choice(Metric.values), required=True),
    "window": Key(choice(Window.values)),
    "amount": Key(optional_number),
    "guaranteed": Key(optional_number),
    "burst": Key(optional_number),
    "enforcement": Key(choice(Enforcement.values)),
    "alert_at": Key(as_is),
}
ALERT_CHANNEL = {  # written by control.configfile.alerts
    "tenant": Key(text),
    "feature": Key(text),
    "name": Key(text, required=True),
    "kind": Key(choice(list(TRANSPORTS)), required=True),
    "to": Key(text_list),
    "url": Key(text),
    "secret": Key(text),
}
DOCUMENT = {
    "providers": Key(each=PROVIDER),
    "pools": Key(each=POOL),
    "tenants": Key(each=TENANT),
    "limits": Key(each=LIMIT),
    "alert_channels": Key(each=ALERT_CHANNEL),
}


def parse_document(document: Any, errors: Errors) -> dict[str, list[Entry]]:
    """The file's entries by section; every problem of shape is added to `errors`."""
    if document is None:
        document = {}
    top = parse_entry(document, DOCUMENT, "", errors)
    return {name: top.data.get(name, []) for name in DOCUMENT}


def parse_entry(value: Any, shape: dict[str, Key], path: str, errors: Errors) -> Entry:
    entry = Entry(path)
    if not isinstance(value, dict):
        errors.add(path, f"expected a mapping, got {_show(value)}")
        entry.valid = False
        return entry
    for name in value:
        if name not in shape:
            expected = ", ".join(shape)
            errors.add(_join(path, name), f"unknown key (expected one of {expected})")
            entry.valid = False
    for name, key in shape.items():
        if name in value:
            entry.valid &= _parse_key(value[name], key, name, _join(path, name), entry, errors)
        elif key.required:
            errors.add(_join(path, name), "missing (required)")
            entry.valid = False
    return entry


def _parse_key(value: Any, key: Key, name: str, path: str, entry: Entry, errors: Errors) -> bool:
    if key.each is not None:
        # A bad item does not spoil its parent: a tenant with one broken feature still
        # gets its other features checked.
        if value is None:
            value = []
        if not isinstance(value, list):
            errors.add(path, f"expected a list, got {_show(value)}")
            return False
        entry.data[name] = [
            parse_entry(item, key.each, f"{path}[{i}]", errors) for i, item in enumerate(value)
        ]
        return True
    if key.shape is not None:
        nested = parse_entry(value, key.shape, path, errors)
        entry.data[name] = nested.data
        return nested.valid
    assert key.coerce is not None
    try:
        entry.data[name] = key.coerce(value)
    except ValueError as error:
        errors.add(path, str(error))
        return False
    return True


def _file_order(path: str) -> list[Any]:
    """`limits[10].amount` after `limits[9].scope`, and sections in their usual order."""
    name = path.partition(".")[0].split("[", 1)[0]
    order = list(DOCUMENT).index(name) if name in DOCUMENT else -1
    parts = re.split(r"\[(\d+)\]", path)
    return [order, *((int(p), "") if i % 2 else (-1, p) for i, p in enumerate(parts))]


def _join(path: str, name: Any) -> str:
    return f"{path}.{name}" if path else str(name)
