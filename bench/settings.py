"""The product's settings plus the baseline views of the benchmark, nothing else changed."""

from __future__ import annotations

from config.settings import *  # noqa: F403

ROOT_URLCONF = "bench.urls"
