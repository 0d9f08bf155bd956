"""Numbers, money and durations as the console shows them."""

from __future__ import annotations

import pytest

from console.templatetags.console_tags import amount, duration


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("0.0000258", "$0.000026"),
        ("0.15", "$0.15"),
        ("0.1", "$0.10"),
        ("0.00033", "$0.00033"),
        ("1234.5", "$1,234.50"),
        ("0", "$0.00"),
        (None, "-"),
    ],
)
def test_money_to_the_millionth_of_a_dollar(value: str | None, shown: str) -> None:
    assert amount(value, "usd") == shown


def test_counts_are_whole_with_thousands() -> None:
    assert amount(20000.0, "tokens") == "20,000"


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(41_097, "11 h 24 min"), (59, "59 s"), (3_600, "1 h"), (90_000, "1 d 1 h"), (None, "-")],
)
def test_durations_read_as_hours_and_minutes(seconds: int | None, shown: str) -> None:
    assert duration(seconds) == shown
