"""The brownout scenario: a chat feature and a batch job on one provider account (pool A), a
second account (pool B) as chat's failover. At minute 2 account A's capacity drops to 40%
for 3 minutes, and for 30 s of it A answers 30% of the calls it admits with a 500.

Three runs of the same seeded traffic, each on fresh accounts and fresh pools:

- `no platform`: the callers call account A directly with the usual exponential-backoff
  retries (full jitter) on a 429 or a 5xx;
- `static`: through the SDK's `wrap_openai` and pools whose capacity is the configured one
  (the breaker on);
- `adaptive`: the same with `backpressure.adaptive`, so A's share follows the provider's 429s.

Time is compressed: a simulated minute lasts `minute_s` real seconds (10: the run's 7
minutes take 70 s). The quota server knows real minutes only, so the pools' per-minute
amounts are the accounts' rates per real minute, their `burst` (the bucket's depth) is a
simulated minute's amount, and the pools' backpressure durations (cooldown, recovery, the
breaker's window and open time) are their defaults divided by the compression.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import openai
from quotaclient import Quota, QuotaClient, RateLimited, Unavailable, wrap_openai

from control.configfile import config_apply
from providers.models import LanguageModel
from quotas.keys import api_key_create
from quotas.plan import plans
from sim.brownout_provider import Answer, Weather, WeatheredAccount, WeatheredProvider
from sim.provider import Latency
from sim.traffic import (
    BATCH,
    CHAT,
    Clock,
    Request,
    Scenario,
    batch_request,
    chat_schedule,
    join_all,
    message_of,
)
from tenants.models import Tenant

TENANT = "brownout-sim"
PROVIDER = "brownout-provider"
MODEL = "sim-model"
OWNER = "owner@brownout-sim.example"
RUNS = ("no platform", "static", "adaptive")

# The traffic: chat needs about an eighth of A's normal capacity, a third of it in the
# brownout; the batch job's workers would take several times A's capacity.
TRAFFIC = Scenario(
    seconds=70.0,
    warmup=5.0,
    chat_rate=1.0,
    chat_patience=6.0,
    batch_workers=12,
)


@dataclass(frozen=True)
class Brownout:
    """The scenario. Minutes are simulated minutes; capacities are per simulated minute."""

    traffic: Scenario = TRAFFIC
    minute_s: float = 10.0  # real seconds a simulated minute lasts
    tpm: int = 20_000  # account A
    rpm: int = 200
    failover_size: float = 0.5  # account B, chat's failover, next to A
    protect: float = 0.3  # A's share kept for interactive calls
    start_minute: float = 2.0
    minutes: float = 3.0
    capacity: float = 0.4
    errors_at_minute: float = 3.0
    errors_seconds: float = 30.0  # simulated seconds
    error_rate: float = 0.3
    # whether the provider's rate-limit headers show the drop (see Weather.visible)
    visible: bool = False
    # the callers' exponential backoff (real seconds): full jitter in base * 2**n up to cap
    backoff_base: float = 0.25
    backoff_cap: float = 4.0
    attempts: int = 6  # provider attempts before a call fails

    @property
    def compression(self) -> float:
        return 60.0 / self.minute_s

    def at(self, minute: float) -> float:
        """Real seconds since the run's start."""
        return minute * self.minute_s

    @property
    def window(self) -> tuple[float, float]:
        """The brownout, in real seconds."""
        return self.at(self.start_minute), self.at(self.start_minute + self.minutes)

    def weather(self) -> Weather:
        errors = self.at(self.errors_at_minute)
        return Weather(
            *self.window,
            capacity=self.capacity,
            errors_from=errors,
            errors_to=errors + self.errors_seconds / self.compression,
            error_rate=self.error_rate,
            visible=self.visible,
        )

    def shortened(self, minute_s: float, batch_workers: int) -> Brownout:
        """The same story in shorter minutes (for the test), at the same real rates: the
        accounts' per-minute amounts shrink with the minute."""
        traffic = replace(
            self.traffic, seconds=7 * minute_s, warmup=minute_s / 2, batch_workers=batch_workers
        )
        scale = minute_s / self.minute_s
        return replace(
            self,
            traffic=traffic,
            minute_s=minute_s,
            tpm=int(self.tpm * scale),
            rpm=int(self.rpm * scale),
        )


@dataclass
class Call:
    """One logical call and what happened to its attempts, as its caller saw them."""

    feature: str
    wanted: float  # real seconds since the run started
    done: float | None = None
    tokens: int = 0  # input + output of the answer
    generation_s: float = 0.0  # the answer's time at the model (not waiting)
    refusals: int = 0  # the platform said 429 or 503
    provider_429s: int = 0  # a provider 429 reached the caller
    provider_5xx: int = 0  # a provider 5xx reached the caller
    failed_over: bool = False

    @property
    def answered(self) -> bool:
        return self.done is not None

    def wait(self, patience: float) -> float:
        """Time lost before the answer: all of it but the model's own time."""
        if self.done is None:
            return patience
        return self.done - self.wanted - self.generation_s


@dataclass(frozen=True)
class BrownoutRun:
    name: str
    brownout: Brownout
    calls: list[Call]
    answers: list[Answer]  # both accounts' logs
    seconds: float


def pool_slugs(name: str) -> tuple[str, str]:
    stamp = f"{name.replace(' ', '-')}-{time.time_ns() // 1_000_000}"
    return f"brownout-a-{stamp}", f"brownout-b-{stamp}"


def backpressure(brownout: Brownout, adaptive: bool) -> dict[str, Any]:
    """The defaults, compressed. The breaker opens at a quarter of the calls failing rather
    than half: the spell's 30% of 5xx would never reach the default's half."""
    c = brownout.compression
    return {
        "adaptive": adaptive,
        "cooldown_seconds": 2.0 / c,
        "recovery_seconds": 300.0 / c,
        "breaker_window_seconds": 30.0 / c,
        "breaker_open_seconds": 30.0 / c,
        "breaker_min_calls": 10,
        "breaker_failure_ratio": 0.25,
    }


def pool_limits(pool: str, brownout: Brownout, size: float) -> list[dict[str, Any]]:
    """Per real minute, with a simulated minute's amount as the bucket's depth."""
    c = brownout.compression
    return [
        {
            "scope": {"pool": pool},
            "metric": metric,
            "window": "minute",
            "amount": int(amount * size * c),
            "burst": int(amount * size),
        }
        for metric, amount in (("tokens", brownout.tpm), ("requests", brownout.rpm))
    ]


def config_document(pools: tuple[str, str], brownout: Brownout, adaptive: bool) -> dict[str, Any]:
    a, b = pools
    pressure = backpressure(brownout, adaptive)
    features = [
        {"slug": CHAT, "owner": OWNER, "priority": "interactive", "pools": [a, b]},
        {"slug": BATCH, "owner": OWNER, "priority": "batch", "pools": [a]},
    ]
    return {
        "providers": [
            {
                "slug": PROVIDER,
                "models": [{"name": MODEL, "input_per_mtok": 0.15, "output_per_mtok": 0.60}],
            }
        ],
        "pools": [
            {
                "slug": a,
                "provider": PROVIDER,
                "models": [MODEL],
                "position": 1,
                "protect": {"interactive": brownout.protect},
                "backpressure": pressure,
            },
            {
                "slug": b,
                "provider": PROVIDER,
                "models": [MODEL],
                "position": 2,
                "backpressure": pressure,
            },
        ],
        "tenants": [{"slug": TENANT, "owners": [OWNER], "features": features}],
        "limits": pool_limits(a, brownout, 1.0) + pool_limits(b, brownout, brownout.failover_size),
    }


def configure(pools: tuple[str, str], brownout: Brownout, adaptive: bool) -> str:
    """Writes the run's pools and features; returns a new API key."""
    config_apply(config_document(pools, brownout, adaptive))
    tenant = Tenant.objects.get(slug=TENANT)
    secret = api_key_create(tenant=tenant, name=f"brownout {pools[0]}").secret
    plans.clear()  # the API server runs in this process: no waiting for its recheck
    return secret


def chars_per_token() -> float:
    return float(LanguageModel.objects.get(provider__slug=PROVIDER, name=MODEL).chars_per_token)


def account(
    name: str, brownout: Brownout, size: float, weather: Weather, clock: Clock
) -> WeatheredAccount:
    per_token = chars_per_token()
    tokens, requests = brownout.tpm * size, brownout.rpm * size
    return WeatheredAccount(
        name,
        tokens=(tokens, tokens / brownout.minute_s),
        requests=(requests, requests / brownout.minute_s),
        chars_per_token=per_token,
        weather=weather,
        started=clock.started,
        seed=brownout.traffic.seed + len(name),
    )


class Caller:
    """The application's code around one call: the same in every run but for `send`, which
    is the raw provider client without the platform and the SDK-wrapped one with it."""

    def __init__(
        self,
        brownout: Brownout,
        send: Callable[[Call, Request], Any],
        clock: Clock,
        latency: Latency,
    ) -> None:
        self.brownout, self.send, self.clock, self.latency = brownout, send, clock, latency
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._rng = random.Random(brownout.traffic.seed + 2)

    def call(self, request: Request, give_up_at: float) -> Call:
        call = Call(request.feature, self.clock.now())
        failures = 0
        while failures < self.brownout.attempts:
            delay = self._attempt(call, request, failures)
            if delay is None:
                break
            if isinstance(delay, Backoff):
                failures, delay = failures + 1, delay.seconds
            if self.clock.now() + delay > give_up_at or failures >= self.brownout.attempts:
                break
            time.sleep(delay)
        with self._lock:
            self.calls.append(call)
        return call

    def _attempt(self, call: Call, request: Request, failures: int) -> float | Backoff | None:
        """None when answered; a platform refusal's wait; or a provider failure's backoff."""
        try:
            reply = self.send(call, request)
        except (RateLimited, Unavailable) as refusal:
            call.refusals += 1
            return (refusal.retry_after or 1.0) + self._uniform(self.brownout.traffic.jitter)
        except openai.APIStatusError as error:
            if error.status_code == 429:
                call.provider_429s += 1
            else:
                call.provider_5xx += 1
            return Backoff(self._backoff(failures))
        call.done = self.clock.now()
        call.tokens = reply.usage.prompt_tokens + reply.usage.completion_tokens
        call.generation_s = self.latency.seconds(reply.usage.completion_tokens)
        return None

    def _backoff(self, failures: int) -> float:
        b = self.brownout
        return self._uniform(min(b.backoff_cap, b.backoff_base * 2**failures))

    def _uniform(self, top: float) -> float:
        with self._lock:
            return self._rng.uniform(0, top)


@dataclass(frozen=True)
class Backoff:
    seconds: float


def create(client: Any, request: Request, chars_per_token: float) -> Any:
    return client.chat.completions.create(
        model=MODEL,
        messages=message_of(request.input_tokens, chars_per_token),
        max_tokens=request.max_tokens,
        user=request.feature,
        extra_body={"reply_tokens": request.reply_tokens},
    )


@dataclass
class Clients:
    """The provider clients of a run: raw for account A, and wrapped per feature and pool."""

    raw: Any
    wrapped: dict[tuple[str, str], Any] = field(default_factory=dict)


def platform_send(clients: Clients, pools: tuple[str, str], per_token: float) -> Callable[..., Any]:
    """Chat tries pool A and, refused there (the breaker's 503 or no room), pool B at once:
    the wrapper sends to the one account it wraps, so the failover is the caller's, on the
    platform's word. The batch job has pool A only."""
    a, b = pools

    def send(call: Call, request: Request) -> Any:
        if request.feature == BATCH:
            return create(clients.wrapped[BATCH, a], request, per_token)
        try:
            return create(clients.wrapped[CHAT, a], request, per_token)
        except (RateLimited, Unavailable):
            call.failed_over = True
            return create(clients.wrapped[CHAT, b], request, per_token)

    return send


def raw_send(clients: Clients, per_token: float) -> Callable[..., Any]:
    def send(call: Call, request: Request) -> Any:
        return create(clients.raw, request, per_token)

    return send


@contextmanager
def provider_clients(
    accounts: tuple[WeatheredAccount, WeatheredAccount], latency: Latency
) -> Iterator[tuple[openai.OpenAI, openai.OpenAI]]:
    with ExitStack() as stack:
        upstreams = []
        for one in accounts:
            provider = stack.enter_context(WeatheredProvider(one, latency))
            upstream = openai.OpenAI(
                base_url=provider.url, api_key="sim", max_retries=0, timeout=30
            )
            upstreams.append(stack.enter_context(upstream))
        yield upstreams[0], upstreams[1]


def wrap_all(
    upstreams: tuple[openai.OpenAI, openai.OpenAI],
    quota: QuotaClient,
    pools: tuple[str, str],
    brownout: Brownout,
) -> dict[tuple[str, str], Any]:
    low = brownout.traffic.batch_min_tokens
    return {
        (CHAT, pools[0]): wrap_openai(upstreams[0], Quota(CHAT, client=quota, pool=pools[0])),
        (CHAT, pools[1]): wrap_openai(upstreams[1], Quota(CHAT, client=quota, pool=pools[1])),
        (BATCH, pools[0]): wrap_openai(
            upstreams[0], Quota(BATCH, client=quota, pool=pools[0], min_output_tokens=low)
        ),
    }


def run_once(quota_url: str, brownout: Brownout, name: str) -> BrownoutRun:
    pools = pool_slugs(name)
    secret = configure(pools, brownout, name == "adaptive")  # written for every run alike
    quota = QuotaClient(quota_url, secret) if name != "no platform" else None
    traffic = brownout.traffic
    latency = Latency(traffic.first_token_s, traffic.per_token_s)
    clock = Clock()
    accounts = (
        account("A", brownout, 1.0, brownout.weather(), clock),
        account("B", brownout, brownout.failover_size, Weather(), clock),
    )
    per_token = chars_per_token()
    try:
        with provider_clients(accounts, latency) as upstreams:
            clients = Clients(upstreams[0])
            if quota is not None:
                clients.wrapped = wrap_all(upstreams, quota, pools, brownout)
                send = platform_send(clients, pools, per_token)
            else:
                send = raw_send(clients, per_token)
            caller = Caller(brownout, send, clock, latency)
            drive(caller, traffic)
            seconds = clock.now()
    finally:
        if quota is not None:
            quota.close()
    answers = sorted(accounts[0].entries() + accounts[1].entries(), key=lambda a: a.at)
    return BrownoutRun(name, brownout, list(caller.calls), answers, seconds)


def drive(caller: Caller, traffic: Scenario) -> None:
    """The batch workers back to back and people chatting (an open loop), side by side."""

    def worker(n: int) -> None:
        rng = random.Random(traffic.seed * 1000 + n)
        while caller.clock.now() < traffic.seconds:
            caller.call(batch_request(rng, traffic), give_up_at=traffic.seconds)

    def chat() -> None:
        people = []
        for at, request in chat_schedule(traffic):
            time.sleep(max(0.0, at - caller.clock.now()))
            person = threading.Thread(
                target=caller.call, args=(request, at + traffic.chat_patience)
            )
            person.start()
            people.append(person)
        join_all(people, traffic.seconds + traffic.chat_patience + 30, caller.clock)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(traffic.batch_workers)]
    threads.append(threading.Thread(target=chat))
    for thread in threads:
        thread.start()
    join_all(threads, traffic.seconds + traffic.chat_patience + 60, caller.clock)


def simulate(quota_url: str, brownout: Brownout) -> list[BrownoutRun]:
    """The three runs, one after the other."""
    return [run_once(quota_url, brownout, name) for name in RUNS]
