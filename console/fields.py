"""Form fields that let owners type what they mean: percentages for alert thresholds, and
amounts without the database's six decimal places."""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from django import forms
from django.core.exceptions import ValidationError


def plain_number(value: Any) -> str:
    """20000 for Decimal("20000.000000"), 0.000026 for Decimal("0.000026"), "" for None."""
    if value is None or value == "":
        return ""
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return str(value)
    text = f"{number:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


class PlainDecimalField(forms.DecimalField):
    """A decimal shown without trailing zeros, in a text box that does not step by 0.000001."""

    widget = forms.TextInput(attrs={"inputmode": "decimal", "size": 10})

    def prepare_value(self, value: Any) -> Any:
        return plain_number(value) if isinstance(value, Decimal | int | float) else value

    def widget_attrs(self, widget: forms.Widget) -> dict[str, Any]:
        return {}  # no step, min or max: the model's validation says what is wrong, in words


class PercentListField(forms.Field):
    """Alert thresholds typed as percentages ("50, 80, 100"), stored as fractions
    ([0.5, 0.8, 1.0]). Empty means no threshold alerts."""

    widget = forms.TextInput(attrs={"size": 12, "placeholder": "50, 80, 100"})
    default_error_messages = {
        "invalid": "Type percentages of the amount separated by commas, like 50, 80, 100.",
    }

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list):
            return ", ".join(plain_number(Decimal(str(v)) * 100) for v in value)
        return value

    def to_python(self, value: Any) -> list[float]:
        if isinstance(value, list):
            return value
        if str(value).strip().startswith("["):  # the stored form, fractions: [0.5, 0.8]
            return self._fractions(str(value))
        parts = [p for p in re.split(r"[,\s;]+", str(value or "").replace("%", " ")) if p]
        try:
            percents = [Decimal(p) for p in parts]
        except InvalidOperation:
            raise ValidationError(self.error_messages["invalid"], code="invalid") from None
        if any(not 0 < p <= 200 for p in percents):
            raise ValidationError(
                "Each threshold is a percentage of the amount, above 0 and at most 200, like 80.",
                code="range",
            )
        return [float(p / 100) for p in percents]

    def _fractions(self, value: str) -> list[float]:
        try:
            fractions = json.loads(value)
        except ValueError:
            raise ValidationError(self.error_messages["invalid"], code="invalid") from None
        if not isinstance(fractions, list):
            raise ValidationError(self.error_messages["invalid"], code="invalid")
        return fractions  # Limit.clean checks each one
