"""Client SDK of the LLM quota platform.

Reserve the worst case of an LLM call before making it, commit what it used afterwards:

    from quotaclient import QuotaClient

    quota = QuotaClient("http://quota:8000", api_key="...")
    with quota.reserve("chat", "gpt-4o-mini", messages=msgs, max_output_tokens=500) as r:
        reply = call_the_model(max_tokens=r.output_tokens)
        r.record_usage(reply.input_tokens, reply.output_tokens, finish_reason="stop")

or protect an existing OpenAI or Anthropic client with `wrap_openai` / `wrap_anthropic`.
The package needs only httpx; openai and anthropic are used only if you wrap their clients.
"""

from __future__ import annotations

from ._async import AsyncQuotaClient, AsyncReservation
from ._errors import (
    BudgetExhausted,
    Conflict,
    FeaturePaused,
    Forbidden,
    InvalidRequest,
    NotFound,
    QuotaError,
    RateLimited,
    Refused,
    ServerError,
    Unauthenticated,
    Unavailable,
    Unreachable,
)
from ._quota import Quota
from ._retry import RetryBudget, RetryPolicy
from ._sync import QuotaClient, Reservation
from ._types import Grant, Limit, Settlement, Usage
from ._version import VERSION as __version__
from ._wrap import wrap_anthropic, wrap_openai

__all__ = [
    "AsyncQuotaClient",
    "AsyncReservation",
    "BudgetExhausted",
    "Conflict",
    "FeaturePaused",
    "Forbidden",
    "Grant",
    "InvalidRequest",
    "Limit",
    "NotFound",
    "Quota",
    "QuotaClient",
    "QuotaError",
    "RateLimited",
    "Refused",
    "Reservation",
    "RetryBudget",
    "RetryPolicy",
    "ServerError",
    "Settlement",
    "Unauthenticated",
    "Unavailable",
    "Unreachable",
    "Usage",
    "__version__",
    "wrap_anthropic",
    "wrap_openai",
]
