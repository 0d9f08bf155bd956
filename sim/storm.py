"""The retry storm: `callers` callers wake together against a pool already at capacity, each
with one call to make (a few of them interactive, one of them much larger than the rest).

Three runs of the same callers, each against a fresh pool and provider account:

- "no platform": the pool has no limits (the calls still pass through the SDK, as in the
  starvation runs), and a caller the provider throttles backs off exponentially with full
  jitter, the textbook way;
- "refusals + retries": the pool has the provider's limits; a refusal is retried by the SDK
  (Retry-After plus full jitter, within its retry budget), `RetryPolicy(schedule=False)`;
- "scheduled": the same pool, and the SDK asks to wait in line (`max_wait_ms`): one reserve
  per call, then one sleep until the promised start.

Each caller has a QuotaClient of its own (as separate workers would): one retry budget each.
What the platform was asked is read back from the usage events of the run's API key; what the
provider was asked, from the fake provider's log. A call's wait is from waking to the start
of the provider call that answered it (its end less the fake provider's latency, which is
exact).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

import httpx2  # what openai sends through
import openai
from quotaclient import Quota, QuotaClient, RateLimited, RetryPolicy, wrap_openai

from quotas.keys import api_key_split
from quotas.store import get_engine
from sim.provider import Account, Entry, FakeProvider, Latency
from sim.run import backlog_tokens, chars_per_token, configure, take_backlog
from sim.traffic import BATCH, CHAT, Scenario, message_of

MODES = ("no platform", "refusals + retries", "scheduled")


@dataclass(frozen=True)
class Storm(Scenario):
    """The storm's sizes; the pool starts where the flood left it (`run.backlog_tokens`)."""

    callers: int = 200
    interactive: int = 40  # of the callers, in the protected class
    tpm: int = 120_000
    rpm: int = 10_000
    protect: float = 0.2
    call_input: tuple[int, int] = (100, 200)
    call_max_tokens: int = 60
    call_reply: tuple[int, int] = (30, 60)
    largest_input: int = 4_800  # one batch caller asks for this much more than the others
    largest_max_tokens: int = 200
    patience: float = 90.0  # a caller gives up after this long (its `max_wait` too)
    backoff_base: float = 0.25  # "no platform": uniform(0, min(cap, base * 2**attempt))
    backoff_cap: float = 8.0


@dataclass
class StormCall:
    feature: str
    input_tokens: int
    max_tokens: int
    reply_tokens: int
    largest: bool = False
    done: float | None = None  # seconds since the callers woke
    output_tokens: int = 0
    upstream_429s: int = 0

    def wait(self, latency: Latency, patience: float) -> float:
        """From waking to the start of the provider call that answered (patience if none)."""
        if self.done is None:
            return patience
        return max(0.0, self.done - latency.seconds(self.output_tokens))


@dataclass
class StormRun:
    mode: str
    storm: Storm
    calls: list[StormCall]
    provider_log: list[Entry]
    events: dict[str, int]  # usage events of the run's key by type
    promised_ms: int | None  # the largest call's promised wait, when it was scheduled
    kept_ms: int | None  # its wait from its reservation to the provider call's start
    seconds: float


def storm_calls(storm: Storm) -> list[StormCall]:
    """The callers, the same in every run (seeded); the largest is one of the batch ones."""
    rng = random.Random(storm.seed)
    calls = [
        StormCall(
            CHAT if n < storm.interactive else BATCH,
            rng.randint(*storm.call_input),
            storm.call_max_tokens,
            rng.randint(*storm.call_reply),
        )
        for n in range(storm.callers)
    ]
    largest = calls[storm.interactive + (storm.callers - storm.interactive) // 2]
    largest.input_tokens, largest.max_tokens = storm.largest_input, storm.largest_max_tokens
    largest.reply_tokens, largest.largest = storm.largest_max_tokens, True
    return calls


@dataclass
class Caller:
    """One caller: its own quota client and wrapped OpenAI client, one logical call."""

    mode: str
    storm: Storm
    client: Any
    per_token: float
    rng: random.Random = field(default_factory=random.Random)
    started: float = 0.0  # when the callers woke (time.monotonic)

    def run(self, call: StormCall) -> None:
        attempt = 0
        while True:
            try:
                reply = self.client.chat.completions.create(
                    model="sim-model",
                    messages=message_of(call.input_tokens, self.per_token),
                    max_tokens=call.max_tokens,
                    user=call.feature,
                    extra_body={"reply_tokens": call.reply_tokens},
                )
            except RateLimited:
                return  # the SDK waited all it was allowed to
            except openai.RateLimitError as error:
                call.upstream_429s += 1
                delay = self._backoff(error, attempt)
                attempt += 1
                if time.monotonic() - self.started + delay > self.storm.patience:
                    return
                time.sleep(delay)
                continue
            call.done = time.monotonic() - self.started
            call.output_tokens = reply.usage.completion_tokens
            return

    def _backoff(self, error: openai.RateLimitError, attempt: int) -> float:
        window = min(self.storm.backoff_cap, self.storm.backoff_base * 2**attempt)
        if self.mode == "no platform":
            return self.rng.uniform(0, window)
        # behind the platform a provider 429 should not happen: honour it as the SDK would
        hint = int(error.response.headers.get("retry-after-ms", "1000")) / 1000
        return hint + self.rng.uniform(0, window)


def quota_client(url: str, secret: str, mode: str) -> QuotaClient:
    if mode == "no platform":
        return QuotaClient(url, secret)
    return QuotaClient(url, secret, retry=RetryPolicy(schedule=mode == "scheduled"))


def run_storm(quota_url: str, storm: Storm, mode: str) -> StormRun:
    pool, secret = configure(storm, limited=mode != "no platform")
    per_token = chars_per_token()
    left = storm.tpm - backlog_tokens(storm)
    account = Account(storm.tpm, storm.rpm, per_token, tokens_left=left)  # replaced at waking
    calls = storm_calls(storm)
    clients = [quota_client(quota_url, secret, mode) for _ in calls]
    try:
        with (
            FakeProvider(account, Latency(storm.first_token_s, storm.per_token_s)) as provider,
            openai.OpenAI(
                base_url=provider.url,
                api_key="sim",
                max_retries=0,
                timeout=storm.patience,
                http_client=openai.DefaultHttpxClient(limits=_connections(storm.callers)),
            ) as upstream,
        ):
            callers = [
                Caller(
                    mode,
                    storm,
                    wrapped(mode, storm, upstream, quota, pool, call.feature),
                    per_token,
                    random.Random(index),
                )
                for index, (quota, call) in enumerate(zip(clients, calls, strict=True))
            ]
            # Making 200 clients takes seconds: the account and the pool are both drained
            # now, the account first (so that the platform never counts on more refill than
            # the provider has), and then the callers wake.
            provider.account = account = Account(storm.tpm, storm.rpm, per_token, left)
            take_backlog(clients[0], pool, storm)
            started = time.monotonic()
            for caller in callers:
                caller.started = started
            threads = [
                threading.Thread(target=caller.run, args=(call,), daemon=True)
                for caller, call in zip(callers, calls, strict=True)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=max(0.0, started + storm.patience + 30 - time.monotonic()))
            seconds = time.monotonic() - started
    finally:
        for client in clients:
            client.close()
    events, promised, kept = _platform_events(secret, storm)
    return StormRun(mode, storm, calls, account.entries(), events, promised, kept, seconds)


def wrapped(
    mode: str, storm: Storm, upstream: openai.OpenAI, quota: QuotaClient, pool: str, feature: str
) -> openai.OpenAI:
    """The caller's OpenAI client, protected for its feature; it may wait up to its patience
    for the platform (the SDK's `max_wait`)."""
    wait = None if mode == "no platform" else storm.patience
    return wrap_openai(upstream, Quota(feature, client=quota, pool=pool, max_wait=wait))


def _connections(callers: int) -> httpx2.Limits:
    """Every caller calls the provider at once: a connection each, no queue in the client."""
    return httpx2.Limits(max_connections=callers + 10, max_keepalive_connections=callers + 10)


def _platform_events(secret: str, storm: Storm) -> tuple[dict[str, int], int | None, int | None]:
    """The run's usage events by type (the key is the run's own); and of the largest call's
    last reservation, the wait it was promised and the one it had, both in the engine's own
    time: from the reservation to the provider call's start (its commit's time less the
    latency the SDK reported), as the ledger records them."""
    prefix = api_key_split(secret)
    engine = get_engine()
    counts: dict[str, int] = {}
    promised: int | None = None
    waited: dict[str, int] = {}
    largest = ""
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], engine.client.xrange(engine.keys.events))
    for _, raw in entries:
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        if fields.get("key") != prefix:
            continue
        kind = fields["type"]
        counts[kind] = counts.get(kind, 0) + 1
        # the largest call is the only one that reserves `largest_max_tokens` of output
        if kind == "reserved" and fields["reserved_output_tokens"] == str(storm.largest_max_tokens):
            largest, promised = fields["rid"], int(fields.get("wait_ms", "0"))
        if kind == "committed" and fields.get("latency_ms"):
            start = int(fields["at_ms"]) - int(fields["latency_ms"])
            waited[fields["rid"]] = start - int(fields["created_ms"])
    counts["reserved"] = counts.get("reserved", 0) - 1  # the backlog's reservation
    counts["committed"] = counts.get("committed", 0) - 1
    return counts, promised, waited.get(largest)


def storm_runs(quota_url: str, storm: Storm) -> list[StormRun]:
    return [run_storm(quota_url, storm, mode) for mode in MODES]
