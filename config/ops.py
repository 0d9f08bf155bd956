"""What an operator's tools ask: is the process alive, is it ready to serve, its metrics.

Answered by `config.middleware.OpsMiddleware` ahead of the rest of the site, so that a load
balancer's probe or Prometheus, which address a node by its IP over plain HTTP, are not
refused by ALLOWED_HOSTS or redirected to HTTPS.
"""

from __future__ import annotations

import glob
import hmac
import ipaddress
import logging
import os
from collections.abc import Callable
from typing import Any

import redis
from django.conf import settings
from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from ledger.metrics import LedgerCollector, ledger_lag_seconds
from quotas.plan import plans
from quotas.store import STORE_UNREACHABLE, get_engine, get_redis

log = logging.getLogger(__name__)
Check = Callable[[], dict[str, Any]]


def healthz(request: HttpRequest) -> JsonResponse:
    """Alive: the process answers. No I/O."""
    return JsonResponse({"status": "ok"})


def readyz(request: HttpRequest) -> JsonResponse:
    """Ready: Redis and the database answer, the plan is loaded and the ledger keeps up."""
    checks = {name: _run(check) for name, check in READINESS.items()}
    ready = all(result["ok"] for result in checks.values())
    body = {"status": "ready" if ready else "not_ready", "checks": checks}
    return JsonResponse(body, status=200 if ready else 503)


def _redis() -> dict[str, Any]:
    """The quota store answers: one Redis, or on a Redis Cluster the master of at least one
    partition's slot. The partitions whose master does not answer are listed, but the node
    stays ready: every node sees the same cluster, and a shard failing over is answered by
    its pools' fail mode while the other shards decide (taking every node out of the load
    balancer would refuse every tenant instead)."""
    client = get_redis()
    if not isinstance(client, RedisCluster):
        client.ping()  # every partition lives on this one Redis
        return {"ok": True}
    spaces = get_engine().spaces
    masters: dict[str, list[int]] = {}
    unreachable = []
    for space in spaces:
        try:
            node = client.get_node_from_key(space.version)
        except RedisClusterException:  # a slot no master serves now
            unreachable.append(space.index)
            continue
        masters.setdefault(node.name, []).append(space.index)
    errors = []
    for name, indices in masters.items():
        try:
            client.ping(target_nodes=client.get_node(node_name=name))
        except (redis.RedisError, *STORE_UNREACHABLE) as exc:
            unreachable.extend(indices)
            errors.append(f"{name}: {type(exc).__name__}: {exc}"[:200])
    body: dict[str, Any] = {"ok": len(unreachable) < len(spaces), "partitions": len(spaces)}
    body["masters"] = len(masters)
    if unreachable:
        body["unreachable_partitions"] = sorted(unreachable)
        if errors:
            body["error"] = "; ".join(errors)[:300]
        log.warning("quota partitions %s unreachable", sorted(unreachable))
    return body


def _database() -> dict[str, Any]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return {"ok": True}


def _plan() -> dict[str, Any]:
    return {"ok": True, "version": plans.get().version}


def _ledger() -> dict[str, Any]:
    lag = ledger_lag_seconds()
    limit = settings.READYZ_MAX_LEDGER_LAG_SECONDS
    return {"ok": not limit or lag <= limit, "lag_seconds": round(lag, 3)}


READINESS: dict[str, Check] = {
    "redis": _redis,
    "database": _database,
    "plan": _plan,
    "ledger": _ledger,
}


def _run(check: Check) -> dict[str, Any]:
    """The check's answer; not ready with the error when the store or the database cannot
    answer (the cluster client's SlotNotCoveredError and RedisClusterUnreachableError are no
    RedisError)."""
    try:
        return check()
    except (redis.RedisError, *STORE_UNREACHABLE, DatabaseError) as exc:
        log.info("not ready: %s", exc)  # the probe's own answer says it; not an error here
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


def metrics(request: HttpRequest) -> HttpResponse:
    refusal = _metrics_refusal(request)
    if refusal is not None:
        return refusal
    return HttpResponse(generate_latest(_registry()), content_type=CONTENT_TYPE_LATEST)


def _registry() -> CollectorRegistry:
    """Under gunicorn and Celery every process writes its values to PROMETHEUS_MULTIPROC_DIR,
    and a scrape sums them; a single process (runserver, tests) answers its own."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _StartedFiles(registry)
    else:
        registry.register(_Delegate(REGISTRY))
    registry.register(LedgerCollector())
    return registry


class _StartedFiles(MultiProcessCollector):
    """prometheus-client's multiprocess collector, leaving out the files of processes that are
    creating theirs: such a file exists empty for a moment before it is sized, and reading it
    would fail the whole scrape (prometheus/client_python#1199)."""

    def collect(self) -> Any:
        files = glob.glob(os.path.join(self._path, "*.db"))
        return self.merge([f for f in files if _sized(f)], accumulate=True)


def _sized(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except OSError:  # its process died, and the file was removed meanwhile
        return False


class _Delegate(Collector):
    """The process's default registry, collected as one more collector."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Any:
        return self.registry.collect()


def _metrics_refusal(request: HttpRequest) -> JsonResponse | None:
    """None when the caller may read the metrics: it presents METRICS_TOKEN, or comes from
    METRICS_ALLOWED_NETWORKS, or neither is set and DEBUG is on. Closed otherwise."""
    token = settings.METRICS_TOKEN
    networks = settings.METRICS_ALLOWED_NETWORKS
    if token and hmac.compare_digest(
        request.headers.get("Authorization", "").encode(), f"Bearer {token}".encode()
    ):
        return None
    if networks and _address_in(request.META.get("REMOTE_ADDR", ""), networks):
        return None
    if not token and not networks and settings.DEBUG:
        return None
    if token:
        response = JsonResponse(
            {"error": "unauthenticated", "message": "Send Authorization: Bearer <METRICS_TOKEN>."},
            status=401,
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return JsonResponse(
        {"error": "forbidden", "message": "Metrics are not served to this address."}, status=403
    )


def _address_in(address: str, networks: list[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(network, strict=False) for network in networks)
