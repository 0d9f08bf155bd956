"""Settling without the database: a web process that cannot load its plan commits, releases,
extends and reads a reservation for the key that made it, from the lease alone.

The reservations are made here with the database up; the settling is done by a fresh process
(tests/quotas/dbless_worker.py) whose database URL points at a closed loopback port, so its
plan load meets a real refused connection, as a worker started during an outage does. It
shares the test's Redis, settings and pepper.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from django.db import OperationalError

from quotas.keys import api_key_create, api_key_revoke, api_key_split
from quotas.models import ApiKey
from quotas.plan import load, plans
from quotas.reservations import get_engine
from quotas.store import config_version_bump
from tests.factories import TenantFactory
from tests.fixtures import World

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CLOSED_PORT = 7119  # nothing listens there: the worker's database refuses every connection
COMMIT = {"input_tokens": 50, "output_tokens": 20, "finish_reason": "stop"}
RESERVE = {"feature": "chat", "model": "gpt-4o-mini", "input_tokens": 100, "max_output_tokens": 100}


def _without_database(calls: list[dict[str, Any]]) -> dict[str, Any]:
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", CLOSED_PORT)) != 0, f"{CLOSED_PORT} is in use"
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:{CLOSED_PORT}/quota",
        "REDIS_URL": settings.REDIS_URL,
        "SECRET_KEY": settings.SECRET_KEY,
        "QUOTA_API_KEY_PEPPER": settings.QUOTA_API_KEY_PEPPER,
        "QUOTA_HASH_TAG": settings.QUOTA_HASH_TAG,
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.quotas.dbless_worker"],
        input=json.dumps(calls),
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    answered: dict[str, Any] = json.loads(done.stdout)
    assert answered["database_reachable"] is False
    assert "plan unavailable, settling by the key's digest" in done.stderr
    return answered


def _get(path: str, key: str) -> dict[str, Any]:
    return {"method": "get", "path": path, "key": key}


def _post(path: str, key: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"method": "post", "path": path, "key": key, "body": body or {}}


def _events(client: redis.Redis, rid: str) -> list[dict[str, str]]:
    return [
        {name.decode(): value.decode() for name, value in fields.items()}
        for _, fields in client.xrange(get_engine().reservation_space(rid).events)
        if fields[b"rid"].decode() == rid
    ]


def _tokens_used_today(world: World) -> int:
    usage = world.client().get("/api/v1/features/chat/usage").json()
    (day,) = [x for x in usage["limits"] if x["window"] == "day" and x["metric"] == "tokens"]
    return int(day["used"])


def test_the_key_that_made_a_reservation_settles_it_while_the_plan_cannot_load(
    world: World, reserve: Any, redis_db: redis.Redis
) -> None:
    world.limit(tenant=world.tenant, metric="tokens", window="day", amount=1_000_000)
    sibling = api_key_create(tenant=world.tenant, name="sibling").secret
    stranger = api_key_create(tenant=TenantFactory(slug="globex"), name="stranger").secret
    revoked = api_key_create(tenant=world.tenant, features=[world.chat], name="revoked")
    plans.clear()
    ids = {name: reserve().json()["id"] for name in ("commit", "release", "extend", "twin")}
    ids["revoked"] = reserve(world.client(revoked.secret)).json()["id"]
    held_until = world.client().get(f"/api/v1/reservations/{ids['extend']}").json()["expires_at"]
    api_key_revoke(api_key=ApiKey.objects.get(pk=revoked.api_key.pk))
    key, path = world.secret, "/api/v1/reservations/"

    answered = _without_database(
        [
            _get(path + ids["extend"], key),
            _post(path + ids["extend"] + "/extend", key, {"ttl_seconds": 600}),
            _post(path + ids["commit"] + "/commit", key, COMMIT),
            _post(path + ids["commit"] + "/commit", key, COMMIT),
            _post(path + ids["commit"] + "/commit", key, {**COMMIT, "output_tokens": 21}),
            _get(path + ids["commit"], key),
            _post(path + ids["release"] + "/release", key),
            _post(path + ids["revoked"] + "/commit", revoked.secret, COMMIT),
        ]
    )["answers"]

    read, extended, committed, replayed, other_body, read_committed, released, late = answered
    assert other_body["body"]["error"] == "conflict"
    assert [a["status"] for a in answered] == [200, 200, 200, 200, 409, 200, 200, 200], answered
    assert read["body"]["status"] == "held"
    assert extended["body"]["expires_at"] > held_until
    assert replayed["body"] == committed["body"]
    assert committed["body"]["usage"]["input_tokens"] == 50
    assert read_committed["body"]["status"] == "committed"
    assert read_committed["body"]["usage"] == committed["body"]["usage"]
    assert released["body"]["status"] == "released"
    assert late["body"]["status"] == "committed"  # revoked meanwhile: it settles its own

    # Back with the database: the usage is in the stream, priced as with the plan, and the
    # limits got their refunds (five reservations of 200 tokens; three commits of 70, one
    # release).
    twin = world.client().post(path + ids["twin"] + "/commit", COMMIT, format="json").json()
    (event,) = [e for e in _events(redis_db, ids["commit"]) if e["type"] == "committed"]
    assert (event["input_tokens"], event["output_tokens"]) == ("50", "20")
    assert event["key"] == api_key_split(key)
    assert int(event["cost_nusd"]) == _nano_usd(world, 50, 20) > 0
    assert twin["usage"] == committed["body"]["usage"]
    assert [e["type"] for e in _events(redis_db, ids["release"])] == ["reserved", "released"]
    assert [e["type"] for e in _events(redis_db, ids["extend"])] == ["reserved", "extended"]
    assert _tokens_used_today(world) == 5 * 200 - 3 * (200 - 70) - 200
    # the reservation another key of the tenant could not touch without the database
    again = world.client(sibling).post(path + ids["extend"] + "/commit", COMMIT, format="json")
    assert again.status_code == 200, again.json()
    assert world.client(stranger).get(path + ids["extend"]).status_code == 404


def _nano_usd(world: World, input_tokens: int, output_tokens: int) -> int:
    per_token = Decimal(1000)  # $/Mtok is 1,000 nano-USD per token
    cost = (
        input_tokens * world.model.input_per_mtok + output_tokens * world.model.output_per_mtok
    ) * per_token
    return math.ceil(cost)


def test_anything_but_the_key_s_own_reservations_answers_as_before(
    world: World, reserve: Any, redis_db: redis.Redis
) -> None:
    """Without the database a key cannot be told valid or not, nor a reservation told another
    key's or missing: every such call answers 503, the same, and settles nothing."""
    sibling = api_key_create(tenant=world.tenant, name="sibling").secret
    stranger = api_key_create(tenant=TenantFactory(slug="globex"), name="stranger").secret
    made_up = "qk_0123456789ab_" + "x" * 32
    plans.clear()
    rid = reserve().json()["id"]
    theirs = reserve(world.client(sibling)).json()["id"]
    path = "/api/v1/reservations/"
    calls = [
        _post(path + rid + "/commit", sibling, COMMIT),
        _post(path + rid + "/release", stranger),
        _post(path + rid + "/extend", made_up, {"ttl_seconds": 600}),
        _get(path + rid, sibling),
        _post(path + theirs + "/commit", world.secret, COMMIT),
        _get(path + "rsv_0123456789abcdef01234567", world.secret),
        _post(path + "rsv_d_chat.shared.gpt-4o-mini-x/commit", world.secret, COMMIT),
        _post("/api/v1/reservations", world.secret, RESERVE),
        _get("/api/v1/features/chat/usage", world.secret),
    ]

    answered = _without_database([*calls, _get(path + rid, "not-a-key")])["answers"]

    *unknowable, garbage = answered
    assert {a["status"] for a in unknowable} == {503}, answered
    assert {(a["body"]["error"], a["retry_after"]) for a in unknowable} == {("unavailable", "5")}
    assert len({a["body"]["message"] for a in unknowable}) == 1  # nothing tells them apart
    assert (garbage["status"], garbage["body"]["error"]) == (401, "unauthenticated")
    assert [e["type"] for e in _events(redis_db, rid)] == ["reserved"]
    assert [e["type"] for e in _events(redis_db, theirs)] == ["reserved"]


def test_a_plan_gone_stale_while_the_database_is_down_settles_by_the_key_s_digest(
    world: World, reserve: Any, redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process has a plan, the configuration changed elsewhere, and the database is gone
    before this process reloads: the commit goes on by the digest, a reserve cannot."""
    narrowed = api_key_create(tenant=world.tenant, features=[world.batch], name="batch").secret
    plans.clear()
    rid = reserve().json()["id"]
    batch = reserve(world.client(narrowed), feature="batch").json()["id"]
    config_version_bump(1)

    def down() -> None:
        raise OperationalError("connection refused")

    monkeypatch.setattr(load, "plan_load", down)
    committed = world.client().post(f"/api/v1/reservations/{rid}/commit", COMMIT, format="json")
    refused = reserve()
    other_feature = world.client(narrowed).post(
        f"/api/v1/reservations/{batch}/release", format="json"
    )

    assert committed.status_code == 200, committed.json()
    assert [e["type"] for e in _events(redis_db, rid)] == ["reserved", "committed"]
    assert (refused.status_code, refused.json()["error"]) == (503, "unavailable")
    assert other_feature.status_code == 200  # a narrowed key settles its own feature's
