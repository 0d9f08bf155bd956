"""Writing a batch of ledger rows: one statement per table, idempotent by reservation id.

PostgreSQL gets the rows through COPY into a temporary table and one INSERT ... SELECT ...
ON CONFLICT; other databases (SQLite in development) through executemany of the same upsert.
"""

from __future__ import annotations

from typing import Any

from django.db import connection
from django.utils import timezone

from ledger.events import (
    IDENTITY_FLAG,
    IDENTITY_NUMBER,
    IDENTITY_TEXT,
    LATEST,
    OUTCOME,
    REFUSAL_COLUMNS,
    USAGE_COLUMNS,
    Row,
)
from ledger.models import DeadLetter, PoolEvent, Refusal, UsageEvent

USAGE_TABLE = UsageEvent._meta.db_table
REFUSAL_TABLE = Refusal._meta.db_table
STAGE_TABLE = "ledger_usage_stage"


def _rank(table: str) -> str:
    return f"(CASE {table}.state WHEN 'held' THEN 0 WHEN 'expired' THEN 1 ELSE 2 END)"


def _granted_later(t: str) -> str:
    """events._granted_later in SQL: the new row's expiry was granted after the stored one's
    (every column of the SET clause reads the stored row as it was)."""
    new_at, old_at = (
        "COALESCE(excluded.expiry_granted_ms, 0)",
        f"COALESCE({t}.expiry_granted_ms, 0)",
    )
    return (
        f"(excluded.expires_ms IS NOT NULL AND ({t}.expires_ms IS NULL OR {new_at} > {old_at} "
        f"OR ({new_at} = {old_at} AND excluded.expires_ms > {t}.expires_ms)))"
    )


def _merge_clause() -> str:
    """rows_merge() in SQL: identity kept from whichever event had it, the expiry granted last,
    the outcome from the furthest state."""
    t = USAGE_TABLE
    newer = f"{_rank('excluded')} > {_rank(t)}"
    sets = [
        f"{c} = CASE WHEN {t}.{c} = '' THEN excluded.{c} ELSE {t}.{c} END" for c in IDENTITY_TEXT
    ]
    sets += [f"{c} = COALESCE({t}.{c}, excluded.{c})" for c in IDENTITY_NUMBER]
    sets += [
        f"{c} = CASE WHEN {_granted_later(t)} THEN excluded.{c} ELSE {t}.{c} END" for c in LATEST
    ]
    sets += [f"{c} = ({t}.{c} OR excluded.{c})" for c in IDENTITY_FLAG]
    sets += [f"{c} = CASE WHEN {newer} THEN excluded.{c} ELSE {t}.{c} END" for c in OUTCOME]
    sets.append("ingested_ms = excluded.ingested_ms")
    return "ON CONFLICT (rid) DO UPDATE SET " + ", ".join(sets)


def _columns(names: tuple[str, ...]) -> str:
    return ", ".join(names)


def usage_rows_write(rows: list[Row]) -> None:
    if not rows:
        return
    if connection.vendor == "postgresql":
        _usage_copy(rows)
    else:
        _usage_executemany(rows)


def _values(rows: list[Row], names: tuple[str, ...]) -> list[tuple[Any, ...]]:
    return [tuple(row[name] for name in names) for row in rows]


def _usage_executemany(rows: list[Row]) -> None:
    marks = ", ".join(["%s"] * len(USAGE_COLUMNS))
    sql = (
        f"INSERT INTO {USAGE_TABLE} ({_columns(USAGE_COLUMNS)}) VALUES ({marks}) {_merge_clause()}"
    )
    with connection.cursor() as cursor:
        cursor.executemany(sql, _values(rows, USAGE_COLUMNS))


def _usage_copy(rows: list[Row]) -> None:
    columns = _columns(USAGE_COLUMNS)
    with connection.cursor() as cursor:
        # the table lives as long as the connection; its rows as long as the transaction
        cursor.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {STAGE_TABLE} ON COMMIT DELETE ROWS AS "
            f"SELECT {columns} FROM {USAGE_TABLE} WITH NO DATA"
        )
        # COPY is psycopg's own: its errors are raised as Django's, like a statement's
        with (
            connection.wrap_database_errors,
            cursor.copy(f"COPY {STAGE_TABLE} ({columns}) FROM STDIN") as copy,
        ):
            for values in _values(rows, USAGE_COLUMNS):
                copy.write_row(values)
        cursor.execute(
            f"INSERT INTO {USAGE_TABLE} ({columns}) SELECT {columns} FROM {STAGE_TABLE} "
            f"{_merge_clause()}"
        )
        # emptied now too: a caller's outer transaction would keep the rows past this batch
        cursor.execute(f"TRUNCATE {STAGE_TABLE}")


def refusal_rows_write(rows: list[Row]) -> None:
    if not rows:
        return
    marks = ", ".join(["%s"] * len(REFUSAL_COLUMNS))
    sql = (
        f"INSERT INTO {REFUSAL_TABLE} ({_columns(REFUSAL_COLUMNS)}) VALUES ({marks}) "
        "ON CONFLICT (rid) DO NOTHING"
    )
    with connection.cursor() as cursor:
        cursor.executemany(sql, _values(rows, REFUSAL_COLUMNS))


def pool_events_write(rows: list[Row]) -> None:
    """Pool events; one stored before (an entry read again) is left as it was."""
    PoolEvent.objects.bulk_create([PoolEvent(**row) for row in rows], ignore_conflicts=True)


def dead_letters_write(rows: list[Row]) -> None:
    """Park entries; one parked before (an entry read again) is left as it was."""
    now = timezone.now()
    letters = [DeadLetter(**row, parked_at=now) for row in rows]
    DeadLetter.objects.bulk_create(letters, ignore_conflicts=True)
