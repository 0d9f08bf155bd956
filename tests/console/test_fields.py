"""The console's form fields: thresholds typed as percentages, amounts without trailing zeros."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError

from console.fields import PercentListField, PlainDecimalField, plain_number


@pytest.mark.parametrize(
    ("typed", "stored"),
    [
        ("50, 80, 100", [0.5, 0.8, 1.0]),
        ("50% 80%", [0.5, 0.8]),
        ("12.5", [0.125]),
        ("", []),
        ("[0.5, 0.8]", [0.5, 0.8]),  # the stored form, as the config file writes it
        ("[]", []),
    ],
)
def test_thresholds_are_typed_as_percentages(typed: str, stored: list[float]) -> None:
    assert PercentListField(required=False).clean(typed) == stored


@pytest.mark.parametrize("typed", ["fifty", "0", "250", "-10", "[0.5"])
def test_a_threshold_that_is_not_a_percentage_is_refused_in_words(typed: str) -> None:
    with pytest.raises(ValidationError) as refused:
        PercentListField(required=False).clean(typed)
    assert "percent" in " ".join(refused.value.messages).lower()


def test_stored_thresholds_are_shown_as_percentages() -> None:
    assert PercentListField().prepare_value([0.5, 0.8, 1.0]) == "50, 80, 100"


@pytest.mark.parametrize(
    ("stored", "shown"),
    [
        (Decimal("20000.000000"), "20000"),
        (Decimal("0.000026"), "0.000026"),
        (Decimal("1.500000"), "1.5"),
        (None, ""),
    ],
)
def test_amounts_are_shown_without_trailing_zeros(stored: Decimal | None, shown: str) -> None:
    assert plain_number(stored) == shown
    if stored is not None:
        assert PlainDecimalField().prepare_value(stored) == shown
