"""Reading this process's Prometheus metrics in tests: a counter's value now, to compare
before and after some traffic (the default registry lives as long as the test process)."""

from __future__ import annotations

from prometheus_client import REGISTRY


def sample(name: str, **labels: str) -> float:
    """The sample's value, 0 when it was never recorded."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Moves:
    """`moved()`: how much each sample changed since this object was made."""

    def __init__(self, *samples: tuple[str, dict[str, str]]) -> None:
        self.samples = samples
        self.before = [sample(name, **labels) for name, labels in samples]

    def moved(self) -> list[float]:
        return [
            sample(name, **labels) - before
            for (name, labels), before in zip(self.samples, self.before, strict=True)
        ]
