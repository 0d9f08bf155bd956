"""The reservation API (v1) on the wire, shared by the sync and async clients: request bodies
in, typed values or typed errors out. Nothing here does I/O."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from ._errors import ServerError, error_from_response
from ._messages import for_estimate
from ._retry import Waiter
from ._version import VERSION

API_PREFIX = "/api/v1"


@dataclass(frozen=True)
class ReserveRequest:
    """One reservation request. Its idempotency key stays the same across retries, so a
    retry after a lost answer returns the first reservation instead of taking a second."""

    body: dict[str, Any]
    ttl_seconds: int


def reserve_request(
    *,
    feature: str,
    model: str,
    max_output_tokens: int,
    input_tokens: int | None = None,
    messages: Iterable[Any] | None = None,
    prompt: str | None = None,
    min_output_tokens: int | None = None,
    priority: str | None = None,
    pool: str | None = None,
    ttl_seconds: int = 60,
    idempotency_key: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> ReserveRequest:
    inputs = {"input_tokens": input_tokens, "messages": messages, "prompt": prompt}
    given = [name for name, value in inputs.items() if value is not None]
    if len(given) != 1:
        raise ValueError("Give exactly one of input_tokens, messages or prompt.")
    body: dict[str, Any] = {
        "feature": feature,
        "model": model,
        "max_output_tokens": max_output_tokens,
        "ttl_seconds": ttl_seconds,
        "idempotency_key": idempotency_key or f"qc-{uuid.uuid4().hex}",
    }
    if input_tokens is not None:
        body["input_tokens"] = input_tokens
    elif messages is not None:
        body["messages"] = for_estimate(messages)
    else:
        body["prompt"] = prompt
    optional = {"min_output_tokens": min_output_tokens, "priority": priority, "pool": pool}
    body.update({k: v for k, v in optional.items() if v is not None})
    if metadata:
        body["metadata"] = dict(metadata)
    return ReserveRequest(body, ttl_seconds)


def with_wait(body: dict[str, Any], waiter: Waiter) -> dict[str, Any]:
    """The reserve body, offering to wait in line for what is left of the caller's wait."""
    wait = waiter.max_wait_ms()
    return body if wait is None else {**body, "max_wait_ms": wait}


def base_url_of(base_url: str | None) -> str:
    url = (base_url or os.environ.get("QUOTA_URL") or "").rstrip("/")
    if not url:
        raise ValueError(
            "Pass base_url (the quota server, e.g. http://quota:8000) or set QUOTA_URL."
        )
    # Both the server's root and its API root are accepted.
    return url if url.endswith(API_PREFIX) else url + API_PREFIX


def headers_of(api_key: str | None) -> dict[str, str]:
    key = api_key or os.environ.get("QUOTA_API_KEY")
    if not key:
        raise ValueError("Pass api_key or set QUOTA_API_KEY.")
    return {"Authorization": f"Bearer {key}", "User-Agent": f"quotaclient/{VERSION}"}


def decode(response: httpx.Response) -> dict[str, Any]:
    """The JSON body of a success, or the typed error of anything else."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ServerError(
            f"The quota server answered {response.status_code} without a JSON object.",
            status=response.status_code,
        )
    if response.is_success:
        return body
    raise error_from_response(response.status_code, response.headers, body)


def reservation_path(reservation_id: str, action: str = "") -> str:
    return f"/reservations/{reservation_id}" + (f"/{action}" if action else "")
