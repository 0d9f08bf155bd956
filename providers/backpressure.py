"""A pool's backpressure settings: adaptive capacity (AIMD) and its circuit breaker.

Kept on the pool as one mapping (`Pool.backpressure`); a missing key takes its default, so
`{}` is a pool with static capacity and a breaker with the default thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# name: (default, lowest, highest); booleans have no bounds
NUMBERS: dict[str, tuple[float, float, float]] = {
    "floor": (0.25, 0.01, 1.0),  # share of the configured capacity the pool never goes under
    "decrease": (0.7, 0.05, 0.99),  # share multiplied by this on a provider 429
    "cooldown_seconds": (2.0, 0.0, 3600.0),  # at most one decrease per cooldown
    "recovery_seconds": (300.0, 1.0, 86400.0),  # floor back to full, while calls succeed
    "breaker_window_seconds": (30.0, 1.0, 3600.0),
    "breaker_min_calls": (20.0, 1.0, 1_000_000.0),
    "breaker_failure_ratio": (0.5, 0.01, 1.0),
    "breaker_open_seconds": (30.0, 1.0, 3600.0),
}
FLAGS = {"adaptive": False, "breaker": True}


@dataclass(frozen=True, slots=True)
class Backpressure:
    adaptive: bool = False
    breaker: bool = True
    floor: float = 0.25
    decrease: float = 0.7
    cooldown_seconds: float = 2.0
    recovery_seconds: float = 300.0
    breaker_window_seconds: float = 30.0
    breaker_min_calls: float = 20.0
    breaker_failure_ratio: float = 0.5
    breaker_open_seconds: float = 30.0

    @classmethod
    def of(cls, raw: Any) -> Backpressure:
        """The settings a mapping gives (validated by `problems`; anything else: default)."""
        if not isinstance(raw, dict) or problems(raw):
            return cls()
        known = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in raw.items() if name in known})


def problems(raw: Any) -> list[str]:
    """What is wrong with a pool's backpressure mapping, in words; empty when nothing."""
    if not isinstance(raw, dict):
        return ['Give a mapping of setting to value, e.g. {"adaptive": true}.']
    found = []
    for name, value in raw.items():
        if name in FLAGS:
            if not isinstance(value, bool):
                found.append(f"'{name}' must be true or false.")
        elif name in NUMBERS:
            _, low, high = NUMBERS[name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                found.append(f"'{name}' must be a number.")
            elif not low <= value <= high:
                found.append(f"'{name}' must be between {low:g} and {high:g}.")
        else:
            known = ", ".join([*FLAGS, *NUMBERS])
            found.append(f"'{name}' is not a setting ({known}).")
    return found
