"""Protect an existing OpenAI or Anthropic client with two changed lines:

    client = wrap_openai(OpenAI(), quota=Quota("chat"))
    client.chat.completions.create(model=..., messages=..., max_tokens=...)  # unchanged

Every call through the wrapped client reserves first (the server estimates the input tokens
from the messages), lowers its output cap to what was granted, and commits the usage and
finish reason the provider reported, also for streams. Neither openai nor anthropic is
imported: the wrappers read the clients they are given."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from . import _anthropic, _openai
from ._anthropic_stream import AsyncStreamManager, StreamManager
from ._calls import Plan, Report, Tracker, settle, settle_async
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


def protect(
    quota: Quota, provider: Provider, create: Callable[..., Any], fit: Fit = unchanged
) -> Callable[..., Any]:
    """`create` reserving first and settling after; a refusal raised as `fit` makes it."""

    @functools.wraps(create)
    def protected(*args: Any, **kwargs: Any) -> Any:
        call = provider.plan(kwargs, quota.max_output_tokens, quota.default_output_tokens)
        reservation = admit(quota, call, fit)
        started = time.monotonic()
        try:
            response = create(*args, **provider.prepare(kwargs, call, reservation.output_tokens))
        except BaseException as error:
            settle(reservation, None, error, started)
            raise
        if call.streaming:
            return ProtectedStream(
                response,
                provider.tracker(kwargs),
                lambda report, error: settle(reservation, report, error, started),
            )
        settle(reservation, provider.report(response), None, started)
        return response

    return protected


def protect_async(
    quota: Quota, provider: Provider, create: Callable[..., Any], fit: Fit = unchanged
) -> Callable[..., Any]:
    @functools.wraps(create)
    async def protected(*args: Any, **kwargs: Any) -> Any:
        call = provider.plan(kwargs, quota.max_output_tokens, quota.default_output_tokens)
        reservation = await admit_async(quota, call, fit)
        started = time.monotonic()
        try:
            prepared = provider.prepare(kwargs, call, reservation.output_tokens)
            response = await create(*args, **prepared)
        except BaseException as error:
            await settle_async(reservation, None, error, started)
            raise
        if call.streaming:

            async def finish(report: Report, error: BaseException | None) -> None:
                await settle_async(reservation, report, error, started)

            return AsyncProtectedStream(response, provider.tracker(kwargs), finish)
        await settle_async(reservation, provider.report(response), None, started)
        return response

    return protected


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
    create = guard(quota, OPENAI, completions.create, refusal_fitter(target))
    chat = Overlay(target.chat, completions=Overlay(completions, create=create))
    wrapped: Any = Overlay(target, chat=chat, **rewrap(target, quota, wrap_openai))
    return cast(C, wrapped)


def wrap_anthropic(client: C, quota: Quota) -> C:
    """An Anthropic (or AsyncAnthropic) client whose `messages.create` and `messages.stream`
    are protected; everything else is the client's own."""
    target: Any = client
    messages = target.messages
    fit = refusal_fitter(target)
    if is_async(messages.create):
        create = protect_async(quota, ANTHROPIC, messages.create, fit)
        manager: type[Any] = AsyncStreamManager
    else:
        create = protect(quota, ANTHROPIC, messages.create, fit)
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
