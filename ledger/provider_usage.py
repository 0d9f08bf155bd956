"""Providers' own usage and cost exports, and their drift from the ledger per pool, model
and day.

Read from files (no network): the JSON pages of OpenAI's organization Usage API
(`/v1/organization/usage/completions`) and Costs API (`/v1/organization/costs`), and of
Anthropic's Admin API usage report (`/v1/organizations/usage_report/messages`) and cost report
(`/v1/organizations/cost_report`); or the same results flattened to CSV, one row per result
with the bucket's start (`start_time` / `starting_at`) and nested fields as dotted columns
(`cache_creation.ephemeral_5m_input_tokens`, `amount.value`). Buckets of any width add up to
days (UTC). A pool is one provider account, so every file is imported for one pool.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from django.db import transaction

from ledger.models import ProviderUsage
from providers.models import Pool

NANO = Decimal(1_000_000_000)
FIELDS = ("requests", "input_tokens", "cached_input_tokens", "output_tokens", "cost_nusd")


class ExportInvalid(ValueError):
    pass


@dataclass
class DayUsage:
    requests: int | None = None
    input_tokens: int | None = None
    cached_input_tokens: int | None = None
    output_tokens: int | None = None
    cost_nusd: int | None = None

    def add(self, name: str, value: int) -> None:
        setattr(self, name, (getattr(self, name) or 0) + value)


def _results(text: str, name: str) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(bucket start, result) pairs from JSON pages (one, or a list of them) or CSV rows."""
    if name.endswith(".csv"):
        for row in csv.DictReader(io.StringIO(text)):
            start = row.pop("start_time", None) or row.pop("starting_at", None)
            yield start, _nest(row)
        return
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise ExportInvalid(f"{name}: not JSON ({exc})") from None
    for page in document if isinstance(document, list) else [document]:
        for bucket in page.get("data", []):
            start = bucket.get("start_time", bucket.get("starting_at"))
            for result in bucket.get("results", []):
                yield start, result


def _nest(row: dict[str, str]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for column, value in row.items():
        target = nested
        *parents, leaf = column.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return nested


def _day(start: Any) -> date:
    if isinstance(start, int | float) or (isinstance(start, str) and start.isdigit()):
        return datetime.fromtimestamp(int(start), UTC).date()
    if isinstance(start, str) and start:
        return datetime.fromisoformat(start.replace("Z", "+00:00")).astimezone(UTC).date()
    raise ExportInvalid(f"bucket without a start time: {start!r}")


def _int(value: Any) -> int:
    return int(Decimal(str(value))) if value not in (None, "") else 0


def _openai(result: dict[str, Any]) -> tuple[str, dict[str, int]]:
    if "amount" in result:  # organization.costs.result; line_item is "model, kind"
        model = str(result.get("line_item") or "").split(",")[0].strip()
        return model, {"cost_nusd": int(Decimal(str(result["amount"]["value"])) * NANO)}
    return str(result.get("model") or ""), {
        "requests": _int(result.get("num_model_requests")),
        "input_tokens": _int(result.get("input_tokens")),  # cached ones included
        "cached_input_tokens": _int(result.get("input_cached_tokens")),
        "output_tokens": _int(result.get("output_tokens")),
    }


def _anthropic(result: dict[str, Any]) -> tuple[str, dict[str, int]]:
    if "amount" in result:  # in the lowest currency unit (cents), as a decimal string
        return str(result.get("model") or ""), {
            "cost_nusd": int(Decimal(str(result["amount"])) / 100 * NANO)
        }
    creation = result.get("cache_creation") or {}
    cached = _int(result.get("cache_read_input_tokens"))
    written = sum(_int(v) for v in creation.values())
    return str(result.get("model") or ""), {
        "input_tokens": _int(result.get("uncached_input_tokens")) + cached + written,
        "cached_input_tokens": cached,
        "output_tokens": _int(result.get("output_tokens")),
    }


PARSERS = {"openai": _openai, "anthropic": _anthropic}


def _model_name(raw: str, served: list[str]) -> str:
    """Providers report snapshots (gpt-4o-mini-2024-07-18): the served model it belongs to."""
    matches = [m for m in served if raw == m or raw.startswith(m + "-")]
    return max(matches, key=len) if matches else raw


def provider_usage_import(
    *, pool: str, source: str, files: Iterable[tuple[str, str]]
) -> dict[tuple[date, str], DayUsage]:
    """Import (name, text) export files of one pool; a day and model already imported takes
    the new figures for the fields the files carry (usage and costs come in separate files)."""
    pool_row = Pool.objects.filter(slug=pool).first()
    if pool_row is None:
        raise ExportInvalid(f"no pool '{pool}'")
    served = list(pool_row.served_models.values_list("name", flat=True))
    days: dict[tuple[date, str], DayUsage] = defaultdict(DayUsage)
    names = []
    for name, text in files:
        names.append(name)
        for start, result in _results(text, name):
            model, values = PARSERS[source](result)
            usage = days[(_day(start), _model_name(model, served))]
            for field, value in values.items():
                usage.add(field, value)
    _store(pool, source, days, ", ".join(names))
    return days


@transaction.atomic
def _store(pool: str, source: str, days: dict[tuple[date, str], DayUsage], origin: str) -> None:
    for (day, model), usage in days.items():
        present = {f: getattr(usage, f) for f in FIELDS if getattr(usage, f) is not None}
        row, _ = ProviderUsage.objects.get_or_create(
            pool=pool, day=day, model=model, defaults={"source": source}
        )
        for field, value in present.items():
            setattr(row, field, value)
        row.source, row.imported_from = source, origin[:255]
        row.save()
