"""Runs the same traffic twice against the real quota server: without the platform's limits
and with them, each time against a fresh provider account and a fresh pool.

"Without" is a pool with no limits: callers still go through the SDK (so both runs pay the
same overhead) but every reservation is admitted, as if the callers went straight to the
provider. "With" is the same pool limited to the provider's own TPM and RPM, with the last
`protect` share of it kept for interactive traffic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import openai
from quotaclient import Quota, QuotaClient, wrap_openai

from control.configfile import config_apply
from providers.models import LanguageModel
from quotas.keys import api_key_create
from quotas.plan import plans
from sim.provider import Account, Entry, FakeProvider, Latency
from sim.traffic import BATCH, CHAT, Call, Clock, Driver, Scenario, drive
from tenants.models import Tenant

TENANT = "noisy-sim"
PROVIDER = "sim-provider"
MODEL = "sim-model"
OWNER = "owner@noisy-sim.example"


@dataclass(frozen=True)
class Run:
    """What one run recorded: every logical call, and every answer of the provider."""

    name: str
    limited: bool
    scenario: Scenario
    calls: list[Call]
    provider_log: list[Entry]
    seconds: float


def config_document(pool: str, scenario: Scenario, limited: bool) -> dict[str, Any]:
    """The run's configuration as config-as-code (what `quota apply` would read)."""
    limits = [
        {"scope": {"pool": pool}, "metric": "tokens", "window": "minute", "amount": scenario.tpm},
        {"scope": {"pool": pool}, "metric": "requests", "window": "minute", "amount": scenario.rpm},
    ]
    features = [
        {"slug": CHAT, "owner": OWNER, "priority": "interactive"},
        {"slug": BATCH, "owner": OWNER, "priority": "batch"},
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
                "slug": pool,
                "provider": PROVIDER,
                "models": [MODEL],
                **({"protect": {"interactive": scenario.protect}} if limited else {}),
            }
        ],
        "tenants": [{"slug": TENANT, "owners": [OWNER], "features": features}],
        "limits": limits if limited else [],
    }


def configure(scenario: Scenario, limited: bool) -> tuple[str, str]:
    """A new pool (so its buckets start full and no earlier run's state is reused) and a new
    API key; returns (pool slug, key)."""
    pool = f"sim-{'limited' if limited else 'open'}-{time.time_ns() // 1_000_000}"
    config_apply(config_document(pool, scenario, limited))
    tenant = Tenant.objects.get(slug=TENANT)
    secret = api_key_create(tenant=tenant, name=f"simulator {pool}").secret
    # The API server runs in this process: drop its plan now rather than wait for its
    # periodic recheck, which is how a new key becomes known before any reservation.
    plans.clear()
    return pool, secret


def chars_per_token() -> float:
    return float(LanguageModel.objects.get(provider__slug=PROVIDER, name=MODEL).chars_per_token)


def wrapped_clients(
    quota: QuotaClient, upstream: openai.OpenAI, pool: str, scenario: Scenario
) -> dict[str, Any]:
    """One wrapped OpenAI client per feature, sharing the upstream client."""
    return {
        CHAT: wrap_openai(upstream, Quota(CHAT, client=quota, pool=pool)),
        BATCH: wrap_openai(
            upstream,
            Quota(BATCH, client=quota, pool=pool, min_output_tokens=scenario.batch_min_tokens),
        ),
    }


def backlog_tokens(scenario: Scenario) -> int:
    """What the report job already took when the run starts: all but the protected share.

    A per-minute bucket starts full, and a full minute's burst would dominate a run shorter
    than a minute; so the run starts where the flood would have taken the pool anyway, on
    the provider's account and on the platform's pool alike."""
    return int(scenario.tpm * (1 - scenario.protect))


def take_backlog(quota: QuotaClient, pool: str, scenario: Scenario) -> None:
    """The report job's earlier calls, through the API (as the batch feature may: down to
    the protected share)."""
    tokens = backlog_tokens(scenario)
    held = quota.reserve(BATCH, MODEL, input_tokens=tokens - 1, max_output_tokens=1, pool=pool)
    held.commit(tokens - 1, 1, finish_reason="stop", upstream_status=200)


def run_once(quota_url: str, scenario: Scenario, limited: bool) -> Run:
    pool, secret = configure(scenario, limited)
    per_token = chars_per_token()
    left = scenario.tpm - backlog_tokens(scenario)
    account = Account(scenario.tpm, scenario.rpm, per_token, tokens_left=left)
    quota = QuotaClient(quota_url, secret)
    try:
        take_backlog(quota, pool, scenario)
        latency = Latency(scenario.first_token_s, scenario.per_token_s)
        # Retries are the simulator's, not openai's, so that every upstream 429 is counted.
        with (
            FakeProvider(account, latency) as provider,
            openai.OpenAI(
                base_url=provider.url, api_key="sim", max_retries=0, timeout=30
            ) as upstream,
        ):
            clock = Clock()
            clients = wrapped_clients(quota, upstream, pool, scenario)
            calls = drive(Driver(clients, scenario, per_token, clock), scenario)
            seconds = clock.now()
    finally:
        quota.close()
    name = "with the platform" if limited else "without the platform"
    return Run(name, limited, scenario, calls, account.entries(), seconds)


def simulate(quota_url: str, scenario: Scenario) -> list[Run]:
    """Both runs, the same traffic (seeded), one after the other."""
    return [run_once(quota_url, scenario, limited) for limited in (False, True)]
