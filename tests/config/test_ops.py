"""/healthz, /readyz and /metrics: JSON, no auth for the probes, metrics only to whom the
settings allow, and never a line in Django's request log."""

from __future__ import annotations

import json
import logging
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from django.db import DatabaseError
from django.test import Client, override_settings
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.mmap_dict import MmapedDict, mmap_key

import config.celery  # its metrics are exported too
import config.ops
import quotas.store
from ledger.metrics import LedgerCollector
from ledger.services import usage_streams
from quotas.store import redis_client
from tests.fixtures import DEAD_STORE, World
from tests.ledger.stack import Ledger, Services, call, process_env, wait_until

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


def test_readyz_is_503_json_when_the_cluster_client_cannot_reach_the_store(
    world: World, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Errors of the cluster client that are no RedisError answer not ready, not a 500: no
    stream answering the ledger's lag (every shard's slot uncovered), or no node reachable."""
    for stream in usage_streams():
        monkeypatch.setattr(stream, "oldest_unacknowledged_ms", _slot_not_covered)

    def unreachable() -> Any:
        raise redis.exceptions.RedisClusterUnreachableError("no startup node answered")

    monkeypatch.setattr(config.ops, "get_redis", unreachable)
    response = client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["ledger"] == {
        "ok": False,
        "error": "SlotNotCoveredError: no master for the slot",
    }
    assert checks["redis"] == {
        "ok": False,
        "error": "RedisClusterUnreachableError: no startup node answered",
    }
    assert checks["database"]["ok"] is True


def _slot_not_covered(*args: Any) -> Any:
    raise redis.exceptions.SlotNotCoveredError("no master for the slot")


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


# -- several processes: gunicorn's workers and a Celery worker --------------------------------


def _scrape(port: int) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return str(answer.read().decode())


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_one_scrape_sums_every_gunicorn_worker_and_the_celery_worker(
    world: World, tmp_path: Path
) -> None:
    shared = tmp_path / "prometheus"
    shared.mkdir()
    env = process_env(
        Ledger(tmp_path).url,
        settings.REDIS_URL,
        PROMETHEUS_MULTIPROC_DIR=str(shared),
        METRICS_TOKEN=TOKEN,
    )
    body = {
        "feature": "chat",
        "model": world.model.name,
        "input_tokens": 10,
        "max_output_tokens": 10,
    }
    granted = (
        'quota_reservations_total{feature="chat",outcome="granted",pool="shared",'
        'reason="",tenant="acme"}'
    )
    reaped = 'quota_script_duration_seconds_count{script="reap"}'
    with Services(env, tmp_path) as services:
        port = services.web()
        for _ in range(6):
            status, _ = call(port, "POST", "/api/v1/reservations", world.secret, body)
            assert status == 201
        services.start_worker()  # with beat: it expires leases (reap.lua) every 2 s
        wait_until(
            lambda: _value(_scrape(port), reaped) > 0, seconds=60, what="the worker's metrics"
        )
        shown = _scrape(port)

    assert _value(shown, granted) == 6  # whichever worker served each
    assert _value(shown, 'quota_script_duration_seconds_count{script="reserve"}') == 6
    # reap.lua runs in the Celery worker alone: its count came from another process's file
    writers = {path.stem.rsplit("_", 1)[1] for path in shared.glob("*.db")}
    assert len(writers) >= 2


def test_a_scrape_leaves_out_the_file_a_starting_process_has_not_sized_yet(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A process creating its metrics file leaves it empty for a moment; a scrape then still
    answers, with the other processes' values."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    written = MmapedDict(str(tmp_path / "counter_1.db"))
    key = mmap_key("quota_test_starts", "quota_test_starts_total", [], [], "Starts.")
    written.write_value(key, 3.0, 0.0)
    written.close()
    (tmp_path / "counter_2.db").touch()  # the starting process's

    shown = generate_latest(config.ops._registry()).decode()

    assert "quota_test_starts_total 3.0" in shown
