"""Refusals in the wrapped library's own terms: a quota refusal raised by a wrapped OpenAI or
Anthropic client is also that library's `RateLimitError`, so the `except` clauses and retry
decorators written for the provider's 429s handle it too.

The classes are built when a client is wrapped, from the library the client came from (it is
imported by then), so neither openai nor anthropic is a dependency of this package."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import httpx

from ._errors import BudgetExhausted, RateLimited, Refused

# The refusals that a provider would have answered with a 429.
RATE_REFUSALS = (RateLimited, BudgetExhausted)

Fit = Callable[[Refused], Refused]


def unchanged(refusal: Refused) -> Refused:
    return refusal


def library_rate_limit_error(client: Any) -> type[BaseException] | None:
    """The `RateLimitError` of the package `client` comes from (openai, anthropic), if any."""
    library = sys.modules.get(type(client).__module__.split(".")[0])
    error = getattr(library, "RateLimitError", None)
    return error if isinstance(error, type) and issubclass(error, BaseException) else None


def refusal_fitter(client: Any) -> Fit:
    """What a wrapper of `client` raises instead of a quota refusal."""
    library_error = library_rate_limit_error(client)
    if library_error is None:
        return unchanged

    def fit(refusal: Refused) -> Refused:
        if not isinstance(refusal, RATE_REFUSALS):
            return refusal
        cls = fitted_class(type(refusal), library_error)
        return as_library_error(refusal, cls, library_error)

    return fit


_FITTED: dict[tuple[type, type], type] = {}


def fitted_class(refusal_class: type[Refused], library_error: type[BaseException]) -> type:
    """One class per pair, so that every wrapper raises the same one."""
    key = (refusal_class, library_error)
    if key not in _FITTED:
        _FITTED[key] = type(
            refusal_class.__name__,
            (refusal_class, library_error),
            {"__module__": "quotaclient", "__doc__": refusal_class.__doc__},
        )
    return _FITTED[key]


def as_library_error(refusal: Refused, cls: type[Any], library_error: Any) -> Refused:
    """`refusal` as an instance of `cls`: the library's error initialised with a 429 response
    of its own HTTP package (its `retry-after` headers as the quota server's), then the
    refusal's attributes (message, status, body, retry_after, limit) on top."""
    error: Any = BaseException.__new__(cls)
    http = http_package_of(library_error)
    headers = {}
    if refusal.retry_after is not None:
        headers["retry-after"] = str(max(0, math.ceil(refusal.retry_after)))
        headers["retry-after-ms"] = str(round(refusal.retry_after * 1000))
    request = http.Request("POST", "http://quota.invalid/api/v1/reservations")
    response = http.Response(429, headers=headers, json=dict(refusal.body), request=request)
    library_error.__init__(error, refusal.message, response=response, body=dict(refusal.body))
    error.__dict__.update(refusal.__dict__)
    return error  # type: ignore[no-any-return]


def http_package_of(library_error: type) -> Any:
    """The HTTP package the library builds its responses with (httpx, or a fork of it)."""
    module = sys.modules[library_error.__module__]
    return getattr(module, "httpx2", None) or getattr(module, "httpx", None) or httpx
