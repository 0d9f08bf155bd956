"""Provider usage exports (OpenAI, Anthropic) against the ledger: known differences in the
sample files under tests/data give a known drift report, and only some of them alert."""

from __future__ import annotations

from datetime import UTC, date, datetime
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

from ledger.models import ProviderUsage, UsageEvent
from ledger.provider_usage import provider_usage_import
from ledger.selectors import provider_drift
from tests.factories import LanguageModelFactory, PoolFactory, ProviderFactory

pytestmark = pytest.mark.django_db

DATA = Path(__file__).resolve().parents[1] / "data"
NANO = 10**9


def committed(pool: str, model: str, at: str, **usage: int) -> None:
    n = UsageEvent.objects.count()
    created = int(datetime.fromisoformat(at).replace(tzinfo=UTC).timestamp() * 1000)
    UsageEvent.objects.create(
        rid=f"rsv_{n}",
        state="committed",
        pool=pool,
        model=model,
        tenant="acme",
        created_ms=created,
        finished_ms=created + 900,
        ingested_ms=created + 1000,
        **usage,
    )


@pytest.fixture
def pools() -> None:
    mini = LanguageModelFactory(name="gpt-4o-mini")
    PoolFactory(slug="openai-main", served_models=[mini, LanguageModelFactory(name="gpt-4o")])
    sonnet = LanguageModelFactory(
        provider=ProviderFactory(slug="anthropic"), name="claude-sonnet-4-5"
    )
    PoolFactory(slug="anthropic-main", provider=sonnet.provider, served_models=[sonnet])
    for hour, output in ((9, 60_000), (13, 70_000), (20, 70_000)):
        committed(
            "openai-main",
            "gpt-4o-mini",
            f"2026-11-02T{hour:02d}:00:00",
            input_tokens=400_000,
            cached_input_tokens=100_000,
            output_tokens=output,
            cost_nusd=NANO // 10,
        )
    committed(
        "openai-main",
        "gpt-4o-mini",
        "2026-11-03T08:00:00",
        input_tokens=5_000,
        cached_input_tokens=0,
        output_tokens=1_000,
        cost_nusd=3_000_000,
    )
    committed(
        "openai-main",
        "gpt-4o-mini",
        "2026-11-04T08:00:00",
        input_tokens=1,
        cached_input_tokens=0,
        output_tokens=1,
        cost_nusd=1,
    )
    committed(
        "anthropic-main",
        "claude-sonnet-4-5",
        "2026-11-02T11:00:00",
        input_tokens=100_000,
        cached_input_tokens=20_000,
        output_tokens=10_000,
        cost_nusd=450_000_000,
    )


def read(*names: str) -> list[tuple[str, str]]:
    return [(name, (DATA / name).read_text()) for name in names]


def figures(pool: str) -> dict[tuple[date, str, str], tuple[int, int, bool]]:
    return {
        (d.day, d.model, d.metric): (d.ledger, d.provider, d.alert)
        for d in provider_drift(pool=pool)
    }


def test_openai_usage_and_costs_with_known_differences(pools: None) -> None:
    provider_usage_import(
        pool="openai-main",
        source="openai",
        files=read("openai_usage_completions.json", "openai_costs.csv"),
    )

    drift = figures("openai-main")
    nov2, nov3 = date(2026, 11, 2), date(2026, 11, 3)
    assert drift[(nov2, "gpt-4o-mini", "input_tokens")] == (1_200_000, 1_200_000, False)
    assert drift[(nov2, "gpt-4o-mini", "cached_input_tokens")] == (300_000, 300_000, False)
    assert drift[(nov2, "gpt-4o-mini", "output_tokens")] == (200_000, 212_000, True)  # +6%
    assert drift[(nov2, "gpt-4o-mini", "requests")] == (3, 3, False)
    assert drift[(nov2, "gpt-4o-mini", "cost_nusd")] == (300_000_000, 310_000_000, False)  # < $1
    assert drift[(nov2, "gpt-4o", "input_tokens")] == (0, 50_000, True)  # unknown to the ledger
    assert drift[(nov2, "gpt-4o", "output_tokens")] == (0, 5_000, False)  # under the floor
    assert drift[(nov3, "gpt-4o-mini", "input_tokens")] == (5_000, 5_100, False)  # 2%, tiny
    assert (nov3, "gpt-4o-mini", "cost_nusd") not in drift  # no cost export for that day
    assert {day for day, _, _ in drift} == {nov2, nov3}  # days the provider did not report: none
    assert sorted(k for k, v in drift.items() if v[2]) == [
        (nov2, "gpt-4o", "input_tokens"),
        (nov2, "gpt-4o-mini", "output_tokens"),
    ]


def test_anthropic_usage_and_costs_that_agree(pools: None) -> None:
    provider_usage_import(
        pool="anthropic-main",
        source="anthropic",
        files=read("anthropic_usage_report.json", "anthropic_cost_report.json"),
    )

    drift = figures("anthropic-main")
    day = date(2026, 11, 2)
    assert drift == {
        (day, "claude-sonnet-4-5", "input_tokens"): (100_000, 100_000, False),
        (day, "claude-sonnet-4-5", "cached_input_tokens"): (20_000, 20_000, False),
        (day, "claude-sonnet-4-5", "output_tokens"): (10_000, 10_000, False),
        (day, "claude-sonnet-4-5", "cost_nusd"): (450_000_000, 450_000_000, False),
    }  # and no request counts: Anthropic's report has none


def test_importing_the_same_export_twice_is_idempotent_and_the_commands_report_it(
    pools: None,
) -> None:
    files = [str(DATA / "openai_usage_completions.json"), str(DATA / "openai_costs.csv")]
    for _ in range(2):
        call_command(
            "quota",
            "import-usage",
            *files,
            "--pool",
            "openai-main",
            "--source",
            "openai",
            stdout=StringIO(),
        )
    assert ProviderUsage.objects.count() == 3
    assert (
        ProviderUsage.objects.get(day=date(2026, 11, 2), model="gpt-4o-mini").output_tokens
        == 212_000
    )

    out = StringIO()
    call_command("quota", "reconcile", "--pool", "openai-main", "--alerts", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:3] == ["DAY", "MODEL", "METRIC"]
    assert [line.split()[1:3] for line in lines[1:-1]] == [
        ["gpt-4o", "input_tokens"],
        ["gpt-4o-mini", "output_tokens"],
    ]
    assert lines[-1] == "2 of 14 figures above the alert threshold."
