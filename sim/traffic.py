"""The traffic of the starvation story: people chatting, and a report job flooding.

Both features call the provider through the real `openai` client wrapped by the SDK
(`wrap_openai`), the same in both runs; only the quota server's configuration differs. A
refusal (the platform's 429) and an upstream 429 are both waited out the way a well-behaved
client does: for the Retry-After it was given, plus a little jitter so that the workers of
the flood do not come back in lockstep.

- chat (interactive): people arrive at random (Poisson) at `chat_rate` a second; each sends a
  conversation and waits; after `chat_patience` seconds without an answer they give up.
- report-gen (batch): `batch_workers` threads summarise chunks back to back for the whole
  run, with smaller calls than chat's. It accepts a partial grant (`min_output_tokens`), so
  under the platform it is cut short rather than refused outright.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import openai
from quotaclient import RateLimited

CHAT, BATCH = "chat", "report-gen"


@dataclass(frozen=True)
class Scenario:
    """Sizes and rates. Capacities are real per-minute amounts, kept small so that a run of
    `seconds` shows the steady state: the flood drains the buckets in its first seconds."""

    seconds: float = 26.0
    # The flood runs alone first (the report job started before people came) and takes what
    # the backlog left of the buckets (run.backlog_tokens); only what follows is measured.
    warmup: float = 3.0
    tpm: int = 30_000
    rpm: int = 300
    protect: float = 0.3  # the share of the pool's per-minute capacity kept for interactive
    chat_rate: float = 1.0
    chat_input: tuple[int, int] = (150, 250)  # tokens of conversation so far
    chat_max_tokens: int = 120
    chat_reply: tuple[int, int] = (30, 100)  # what the model wants to say: fits max_tokens
    # People leave after this long; they stop arriving this long before the end, so that
    # every chat is settled when the run ends.
    chat_patience: float = 6.0
    batch_workers: int = 16
    batch_input: tuple[int, int] = (100, 160)  # chunks: smaller calls than chat's
    batch_max_tokens: int = 100
    batch_min_tokens: int = 30
    batch_reply: tuple[int, int] = (70, 100)
    first_token_s: float = 0.15  # the provider's latency model
    per_token_s: float = 0.004
    jitter: float = 0.25
    seed: int = 7


@dataclass
class Call:
    """One logical call of a feature, with every attempt it took."""

    feature: str
    wanted: float  # seconds since the run started
    admitted: float | None = None  # start of the attempt that got an answer
    done: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    truncated: bool = False
    refusals: int = 0  # the platform said 429
    upstream_429s: int = 0  # the provider said 429

    @property
    def gave_up(self) -> bool:
        return self.admitted is None

    def wait(self, end: float) -> float:
        """Time lost before the answering attempt; a call given up waited until then."""
        return (self.admitted if self.admitted is not None else end) - self.wanted


@dataclass(frozen=True)
class Request:
    feature: str
    input_tokens: int
    max_tokens: int
    reply_tokens: int


class Clock:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.started


def message_of(tokens: int, chars_per_token: float) -> list[dict[str, str]]:
    """A conversation the estimator counts as about `tokens` input tokens."""
    return [{"role": "user", "content": "x" * int(tokens * chars_per_token)}]


class Driver:
    """Makes calls through one wrapped client per feature and records them."""

    def __init__(
        self,
        clients: dict[str, Any],
        scenario: Scenario,
        chars_per_token: float,
        clock: Clock,
    ) -> None:
        self.clients = clients
        self.scenario = scenario
        self.chars_per_token = chars_per_token
        self.clock = clock
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._rng = random.Random(scenario.seed + 1)  # jitter only

    def call(self, request: Request, give_up_at: float) -> Call:
        call = Call(request.feature, self.clock.now())
        while True:
            attempt = self.clock.now()
            delay = self._attempt(call, request)
            if delay is None:
                call.admitted, call.done = attempt, self.clock.now()
                break
            if self.clock.now() + delay > give_up_at:
                break
            time.sleep(delay + self._jitter())
        with self._lock:
            self.calls.append(call)
        return call

    def _attempt(self, call: Call, request: Request) -> float | None:
        """None when answered, else the seconds to wait before the next attempt."""
        client = self.clients[request.feature]
        try:
            reply = client.chat.completions.create(
                model="sim-model",
                messages=message_of(request.input_tokens, self.chars_per_token),
                max_tokens=request.max_tokens,
                user=request.feature,
                extra_body={"reply_tokens": request.reply_tokens},
            )
        except RateLimited as refusal:
            call.refusals += 1
            return refusal.retry_after if refusal.retry_after is not None else 1.0
        except openai.RateLimitError as error:
            call.upstream_429s += 1
            return int(error.response.headers.get("retry-after-ms", "1000")) / 1000
        call.input_tokens = reply.usage.prompt_tokens
        call.output_tokens = reply.usage.completion_tokens
        call.truncated = reply.choices[0].finish_reason == "length"
        return None

    def _jitter(self) -> float:
        with self._lock:
            return self._rng.uniform(0, self.scenario.jitter)


def chat_schedule(scenario: Scenario) -> list[tuple[float, Request]]:
    """When people ask and what: the same in both runs (seeded)."""
    rng = random.Random(scenario.seed)
    at, schedule = scenario.warmup, list[tuple[float, Request]]()
    while True:
        at += rng.expovariate(scenario.chat_rate)
        if at >= scenario.seconds - scenario.chat_patience:
            return schedule
        request = Request(
            CHAT,
            rng.randint(*scenario.chat_input),
            scenario.chat_max_tokens,
            rng.randint(*scenario.chat_reply),
        )
        schedule.append((at, request))


def batch_request(rng: random.Random, scenario: Scenario) -> Request:
    return Request(
        BATCH,
        rng.randint(*scenario.batch_input),
        scenario.batch_max_tokens,
        rng.randint(*scenario.batch_reply),
    )


def run_chat(driver: Driver, scenario: Scenario) -> None:
    """Each person waits in a thread of their own (an open loop: arrivals do not wait)."""
    with ThreadPoolExecutor(max_workers=64, thread_name_prefix="chat") as pool:
        for at, request in chat_schedule(scenario):
            time.sleep(max(0.0, at - driver.clock.now()))
            give_up_at = at + scenario.chat_patience
            pool.submit(driver.call, request, give_up_at)


def run_batch_worker(driver: Driver, scenario: Scenario, worker: int) -> None:
    rng = random.Random(scenario.seed * 1000 + worker)
    while driver.clock.now() < scenario.seconds:
        driver.call(batch_request(rng, scenario), give_up_at=scenario.seconds)


def drive(driver: Driver, scenario: Scenario) -> list[Call]:
    """Runs the flood and the chat side by side until the scenario's end."""
    threads = [
        threading.Thread(target=run_batch_worker, args=(driver, scenario, n), daemon=True)
        for n in range(scenario.batch_workers)
    ]
    threads.append(threading.Thread(target=run_chat, args=(driver, scenario), daemon=True))
    for thread in threads:
        thread.start()
    join_all(threads, deadline=scenario.seconds + scenario.chat_patience + 30, clock=driver.clock)
    return list(driver.calls)


def join_all(threads: list[threading.Thread], deadline: float, clock: Clock) -> None:
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - clock.now()))
