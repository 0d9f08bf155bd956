"""The reservation engine: Lua scripts in Redis and the small wrapper that calls them.

It takes plain data (keys, amounts, a compiled plan of the limits that apply) and imports no
ORM model, view or settings object; `quotas.plan` compiles the configuration for it.
"""

from __future__ import annotations

from quotas.engine.core import Engine
from quotas.engine.types import (
    Check,
    Conflict,
    Existing,
    Granted,
    KeyHolder,
    LeaseView,
    Lost,
    Missing,
    Owner,
    PoolOption,
    Pressure,
    Refused,
    Report,
    ReserveCall,
    Settled,
    Stale,
    Unavailable,
    Usage,
)

__all__ = [
    "Check",
    "Conflict",
    "Engine",
    "Existing",
    "Granted",
    "KeyHolder",
    "LeaseView",
    "Lost",
    "Missing",
    "Owner",
    "PoolOption",
    "Pressure",
    "Refused",
    "Report",
    "ReserveCall",
    "Settled",
    "Stale",
    "Unavailable",
    "Usage",
]
