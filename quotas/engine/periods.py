"""Calendar periods in a time zone, as epoch milliseconds.

The web node passes the period around its own clock and both neighbours; the script picks
the one that contains Redis's clock, so nodes with skewed clocks still agree.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo


def _floor(local: datetime, window: str) -> datetime:
    if window == "hour":
        return local.replace(minute=0, second=0, microsecond=0)
    if window == "day":
        return local.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "month":
        return local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    raise ValueError(f"not a calendar window: {window}")


def _step(start: datetime, window: str, n: int) -> datetime:
    """The start `n` periods later, in wall-clock terms (a day is a calendar day across DST)."""
    if window == "hour":
        # hours are counted in absolute time, so a DST change neither skips nor repeats one
        return (start.astimezone(UTC) + timedelta(hours=n)).astimezone(start.tzinfo)
    if window == "day":
        naive = start.replace(tzinfo=None) + timedelta(days=n)
        return naive.replace(tzinfo=start.tzinfo)
    month = start.month - 1 + n
    return start.replace(year=start.year + month // 12, month=month % 12 + 1)


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


@lru_cache(maxsize=4096)
def _around(tz: str, window: str, start_ms: int) -> tuple[int, int, int, int]:
    start = datetime.fromtimestamp(start_ms / 1000, ZoneInfo(tz))
    return (
        _ms(_step(start, window, -1)),
        start_ms,
        _ms(_step(start, window, 1)),
        _ms(_step(start, window, 2)),
    )


def periods_around(tz: str, window: str, now_ms: int) -> tuple[int, int, int, int]:
    """(previous start, start, stop, next stop) of the period containing `now_ms` in `tz`."""
    local = datetime.fromtimestamp(now_ms / 1000, ZoneInfo(tz))
    return _around(tz, window, _ms(_floor(local, window)))
