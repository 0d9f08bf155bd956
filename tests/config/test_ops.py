"""/healthz, /readyz and /metrics: JSON, no auth for the probes, metrics only to whom the
settings allow, and never a line in Django's request log."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from django.db import DatabaseError
from django.test import Client, override_settings
from prometheus_client import REGISTRY

import config.celery  # its metrics are exported too
import config.ops
import quotas.store
from ledger.metrics import LedgerCollector
from quotas.store import redis_client
from tests.fixtures import DEAD_STORE, World

TOKEN = "s3cret-metrics-token"


def test_healthz_answers_without_any_io(
    db: Any, client: Client, django_assert_num_queries: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config.ops, "get_redis", lambda: redis_client(DEAD_STORE))
    with django_assert_num_queries(0):
        response = client.get("/healthz", HTTP_HOST="10.0.0.7:8000")  # a probe by IP
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_says_each_check_passed(world: World, client: Client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert {name: check["ok"] for name, check in body["checks"].items()} == {
        "redis": True,
        "database": True,
        "plan": True,
        "ledger": True,
    }


def test_readyz_is_503_json_when_redis_is_down_and_logs_no_error(
    world: World, client: Client, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    monkeypatch.setattr(config.ops, "get_redis", lambda: redis_client(DEAD_STORE))
    with caplog.at_level(logging.INFO):
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not_ready"
    assert body["checks"]["redis"]["ok"] is False
    assert "ConnectionError" in body["checks"]["redis"]["error"]
    assert body["checks"]["database"]["ok"] is True
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_readyz_is_503_when_the_database_is_down(
    world: World, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down() -> dict[str, Any]:
        raise DatabaseError("connection refused")

    monkeypatch.setitem(config.ops.READINESS, "database", down)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"] == {
        "ok": False,
        "error": "DatabaseError: connection refused",
    }


def test_readyz_is_503_while_the_ledger_lags_past_the_threshold(
    world: World, client: Client, reserve: Any
) -> None:
    assert reserve().status_code == 201
    quotas.store.get_engine().clock_offset_ms = 10_000
    with override_settings(READYZ_MAX_LEDGER_LAG_SECONDS=5):
        lagging = client.get("/readyz")
    with override_settings(READYZ_MAX_LEDGER_LAG_SECONDS=0):  # 0: the lag is not checked
        unchecked = client.get("/readyz")
    assert lagging.status_code == 503
    assert lagging.json()["checks"]["ledger"]["ok"] is False
    assert lagging.json()["checks"]["ledger"]["lag_seconds"] >= 10
    assert unchecked.status_code == 200


def test_the_probes_take_get_only(client: Client) -> None:
    response = client.post("/healthz")
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"


@override_settings(SECURE_SSL_REDIRECT=True, ALLOWED_HOSTS=["quota.example.com"])
def test_probes_over_plain_http_by_ip_are_not_redirected_or_refused(client: Client) -> None:
    assert client.get("/healthz", HTTP_HOST="10.0.0.7").status_code == 200
    assert client.get("/admin/", HTTP_HOST="quota.example.com").status_code == 301


# -- /metrics --------------------------------------------------------------------------------


def test_metrics_are_closed_by_default(client: Client) -> None:
    response = client.get("/metrics")
    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"


@override_settings(METRICS_TOKEN=TOKEN)
def test_metrics_want_the_token_when_one_is_set(client: Client) -> None:
    refused = client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong")
    assert refused.status_code == 401
    assert refused["WWW-Authenticate"] == 'Bearer realm="metrics"'
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 200


@pytest.mark.parametrize(("address", "status"), [("10.1.2.3", 200), ("192.0.2.1", 403)])
def test_metrics_are_served_to_the_allowed_networks(
    client: Client, address: str, status: int
) -> None:
    with override_settings(METRICS_ALLOWED_NETWORKS=["10.0.0.0/8"]):
        assert client.get("/metrics", REMOTE_ADDR=address).status_code == status


@override_settings(DEBUG=True)
def test_metrics_are_open_in_debug_when_nothing_is_set(client: Client) -> None:
    assert client.get("/metrics").status_code == 200


@override_settings(METRICS_TOKEN=TOKEN)
def test_a_scrape_shows_decisions_as_traffic_flows(
    world: World, client: Client, reserve: Any
) -> None:
    def scrape() -> str:
        response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
        assert response["Content-Type"].startswith("text/plain; version=")
        return response.content.decode()

    granted = (
        'quota_reservations_total{feature="chat",outcome="granted",pool="shared",'
        'reason="",tenant="acme"}'
    )
    before = _value(scrape(), granted)
    for _ in range(2):
        assert reserve().status_code == 201
    shown = scrape()
    assert _value(shown, granted) == before + 2
    assert _value(shown, "quota_usage_stream_length") == 2
    assert "quota_script_duration_seconds_bucket" in shown
    assert "quota_ledger_lag_seconds" in shown


def _value(exposition: str, sample: str) -> float:
    for line in exposition.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_the_sample_dashboard_queries_only_metrics_the_app_exports(world: World) -> None:
    dashboard = json.loads((Path(__file__).parents[2] / "docs/grafana-dashboard.json").read_text())
    queried = {
        re.sub(r"_(total|bucket)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bquota_[a-z_]+", target["expr"])
    }
    exported = {family.name for family in REGISTRY.collect()} | {
        family.name for family in LedgerCollector().collect()
    }
    assert len(queried) == 10
    assert queried <= exported
