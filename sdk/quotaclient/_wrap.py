"""Protect an existing OpenAI or Anthropic client with two changed lines:

    client = wrap_openai(OpenAI(), quota=Quota("chat"))
    client.chat.completions.create(model=..., messages=..., max_tokens=...)  # unchanged

Every call through the wrapped client reserves first (the server estimates the input tokens
from the messages), lowers its output cap to what was granted, and commits the usage and
finish reason the provider reported, also for streams, with the provider's status and
rate-limit headers (read through the client's raw-response access). The provider client's
own retries are turned off: a provider 429 is released with its status and headers, and the
call reserves again, waiting as the quota server says and spending the retry budget, so that
the platform, not each caller, paces the provider. Neither openai nor anthropic is
imported: the wrappers read the clients they are given."""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from . import _anthropic, _openai
from ._anthropic_stream import AsyncStreamManager, StreamManager
from ._calls import (
    Plan,
    Report,
    Tracker,
    Upstream,
    rate_limit_headers,
    settle,
    settle_async,
    upstream_of_error,
)
from ._fit import Fit, refusal_fitter, unchanged
from ._quota import Quota, admit, admit_async
from ._streams import AsyncProtectedStream, ProtectedStream

C = TypeVar("C")


@dataclass(frozen=True)
class Provider:
    plan: Callable[[Mapping[str, Any], int | None, int], Plan]
    prepare: Callable[[Mapping[str, Any], Plan, int], dict[str, Any]]
    report: Callable[[Any], Report]
    tracker: Callable[[Mapping[str, Any]], Tracker]


OPENAI = Provider(_openai.plan, _openai.prepare, _openai.report, _openai.tracker)
ANTHROPIC = Provider(
    _anthropic.plan,
    _anthropic.prepare,
    _anthropic.report,
    lambda kwargs: _anthropic.StreamTracker(),
)


def is_async(method: Callable[..., Any]) -> bool:
    # The SDKs decorate their methods; the coroutine function is underneath.
    return inspect.iscoroutinefunction(inspect.unwrap(method))


def parsed(raw: Any) -> tuple[Any, Upstream]:
    """The answer of a raw-response call, and the provider's status and rate-limit headers."""
    status = getattr(raw, "status_code", None)
    upstream = Upstream(status, rate_limit_headers(getattr(raw, "headers", None)))
    return raw.parse(), upstream


async def parsed_async(raw: Any) -> tuple[Any, Upstream]:
    """`parsed` for an async client, whose raw response parses in a coroutine."""
    response, upstream = parsed(raw)
    if inspect.isawaitable(response):
        response = await response
    return response, upstream


PROVIDER_WAIT_CAP = 60.0  # seconds: the longest provider retry-after the wrapper waits


def provider_refused_again(error: BaseException, budget: Any) -> float | None:
    """After a provider 429, the seconds to wait (its `retry-after-ms` or `retry-after`)
    before reserving again, while the retry budget allows; None: raise it."""
    upstream = upstream_of_error(error)
    if upstream.status != 429 or not budget.try_spend():
        return None
    return provider_retry_after(upstream.headers or {})


def provider_retry_after(headers: Mapping[str, str]) -> float:
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            seconds = float(headers[name]) / scale
        except (KeyError, ValueError):
            continue
        if 0 <= seconds < PROVIDER_WAIT_CAP:  # also NaN and infinities
            return seconds
        return PROVIDER_WAIT_CAP if seconds >= PROVIDER_WAIT_CAP else 0.0
    return 0.0


def protect(
    quota: Quota,
    provider: Provider,
    create: Callable[..., Any],
    fit: Fit = unchanged,
    raw_create: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    """`create` reserving first and settling after; a refusal raised as `fit` makes it;
    through `raw_create` (the client's raw-response access, without its own retries) when
    there is one."""

    @functools.wraps(create)
    def protected(*args: Any, **kwargs: Any) -> Any:
        call = provider.plan(kwargs, quota.max_output_tokens, quota.default_output_tokens)
        while True:
            reservation = admit(quota, call, fit)
            started = time.monotonic()
            prepared = provider.prepare(kwargs, call, reservation.output_tokens)
            try:
                if raw_create is None:
                    response, upstream = create(*args, **prepared), Upstream()
                else:
                    response, upstream = parsed(raw_create(*args, **prepared))
            except BaseException as error:
                settle(reservation, None, error, started)
                wait = provider_refused_again(error, quota.sync_client().budget)
                if wait is None:
                    raise
                time.sleep(wait)
                continue
            break
        if call.streaming:
            return ProtectedStream(
                response,
                provider.tracker(kwargs),
                lambda report, error: settle(reservation, report, error, started, upstream),
            )
        settle(reservation, provider.report(response), None, started, upstream)
        return response

    return protected


def protect_async(
    quota: Quota,
    provider: Provider,
    create: Callable[..., Any],
    fit: Fit = unchanged,
    raw_create: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    @functools.wraps(create)
    async def protected(*args: Any, **kwargs: Any) -> Any:
        call = provider.plan(kwargs, quota.max_output_tokens, quota.default_output_tokens)
        while True:
            reservation = await admit_async(quota, call, fit)
            started = time.monotonic()
            prepared = provider.prepare(kwargs, call, reservation.output_tokens)
            try:
                if raw_create is None:
                    response, upstream = await create(*args, **prepared), Upstream()
                else:
                    response, upstream = await parsed_async(await raw_create(*args, **prepared))
            except BaseException as error:
                await settle_async(reservation, None, error, started)
                wait = provider_refused_again(error, quota.asyncio_client().budget)
                if wait is None:
                    raise
                await asyncio.sleep(wait)
                continue
            break
        if call.streaming:

            async def finish(report: Report, error: BaseException | None) -> None:
                await settle_async(reservation, report, error, started, upstream)

            return AsyncProtectedStream(response, provider.tracker(kwargs), finish)
        await settle_async(reservation, provider.report(response), None, started, upstream)
        return response

    return protected


def without_retries(client: Any) -> Any:
    """The client with its own retries off (a 429 is the platform's to pace), where it can."""
    with_options = getattr(client, "with_options", None)
    return with_options(max_retries=0) if callable(with_options) else client


def raw_method(resource: Any, name: str) -> Callable[..., Any] | None:
    """`resource.with_raw_response.<name>`: the call answering its raw HTTP response."""
    raw = getattr(resource, "with_raw_response", None)
    method = getattr(raw, name, None) if raw is not None else None
    return method if callable(method) else None


class Overlay:
    """Answers like `target`, except for the attributes it was given."""

    def __init__(self, target: Any, **overrides: Any) -> None:
        self.__dict__.update(overrides)
        self.__dict__["_overlay_target"] = target

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_overlay_target"], name)

    def __repr__(self) -> str:
        return f"<quota-protected {self.__dict__['_overlay_target']!r}>"

    # `with OpenAI() as client:` must go on yielding the protected client. Special methods
    # are looked up on the type, never through __getattr__.
    def __enter__(self) -> Overlay:
        self.__dict__["_overlay_target"].__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> Any:
        return self.__dict__["_overlay_target"].__exit__(*exc_info)

    async def __aenter__(self) -> Overlay:
        await self.__dict__["_overlay_target"].__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> Any:
        return await self.__dict__["_overlay_target"].__aexit__(*exc_info)


def rewrap(client: Any, quota: Quota, wrap: Callable[[Any, Quota], Any]) -> dict[str, Any]:
    """`with_options(...)` / `copy(...)` of a wrapped client stay protected."""
    return {
        name: functools.partial(lambda method, *a, **k: wrap(method(*a, **k), quota), method)
        for name in ("with_options", "copy")
        if callable(method := getattr(client, name, None))
    }


def wrap_openai(client: C, quota: Quota) -> C:
    """An OpenAI (or AsyncOpenAI, AzureOpenAI) client whose `chat.completions.create` is
    protected; everything else is the client's own."""
    target: Any = client
    completions = target.chat.completions
    guard = protect_async if is_async(completions.create) else protect
    raw = raw_method(without_retries(target).chat.completions, "create")
    create = guard(quota, OPENAI, completions.create, refusal_fitter(target), raw)
    chat = Overlay(target.chat, completions=Overlay(completions, create=create))
    wrapped: Any = Overlay(target, chat=chat, **rewrap(target, quota, wrap_openai))
    return cast(C, wrapped)


def wrap_anthropic(client: C, quota: Quota) -> C:
    """An Anthropic (or AsyncAnthropic) client whose `messages.create` and `messages.stream`
    are protected; everything else is the client's own."""
    target: Any = client
    messages = target.messages
    fit = refusal_fitter(target)
    raw = raw_method(without_retries(target).messages, "create")
    if is_async(messages.create):
        create = protect_async(quota, ANTHROPIC, messages.create, fit, raw)
        manager: type[Any] = AsyncStreamManager
    else:
        create = protect(quota, ANTHROPIC, messages.create, fit, raw)
        manager = StreamManager

    @functools.wraps(messages.stream)
    def stream(**kwargs: Any) -> Any:
        return manager(quota, messages.stream, kwargs, fit)

    wrapped: Any = Overlay(
        target,
        messages=Overlay(messages, create=create, stream=stream),
        **rewrap(target, quota, wrap_anthropic),
    )
    return cast(C, wrapped)
