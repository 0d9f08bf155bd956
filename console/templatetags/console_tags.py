"""Numbers and durations as the console's pages show them."""

from __future__ import annotations

from decimal import Decimal

from django import template

register = template.Library()


@register.filter
def amount(value: float | int | Decimal | str | None, metric: str = "") -> str:
    """12,345 for counts; $1.23, $0.15 or $0.000026 (to the millionth of a dollar, without
    trailing zeros past the cents) for cost; "-" for nothing."""
    if value is None or value == "":
        return "-"
    if metric in ("cost_usd", "usd"):
        number = Decimal(str(value))
        if abs(number) >= 1 or number == 0:
            return f"${number:,.2f}"
        digits = f"{number:.6f}".rstrip("0")
        return f"${digits:0<{digits.index('.') + 3}}"  # at least the cents: $0.10
    return f"{int(value):,}"


@register.filter
def duration(seconds: int | str | None) -> str:
    """3 s, 4 min, 2 h 5 min, 3 d 4 h; "-" for nothing (a concurrency limit never resets)."""
    if seconds is None or seconds == "":
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 3600:
        return f"{minutes} min"
    if seconds < 86400:
        rest = minutes - hours * 60
        return f"{hours} h {rest} min" if rest else f"{hours} h"
    rest = hours - days * 24
    return f"{days} d {rest} h" if rest else f"{days} d"


@register.filter
def percent(value: float | str | None) -> str:
    return "-" if value is None or value == "" else f"{float(value) * 100:.1f}%"
