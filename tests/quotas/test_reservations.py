"""The hot path: no SQL, one Redis call per decision, cluster-ready keys, live config."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
from django.conf import settings
from django.db import OperationalError, connection, transaction

from quotas import signals
from quotas.models import ConfigVersion
from quotas.plan import load, plans
from quotas.reservations import get_engine
from quotas.store import config_version_bump, config_version_read
from tenants.models import Feature
from tests.fixtures import World


@pytest.fixture
def redis_commands(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every command the process sends to Redis, by name, whichever way it is sent (the
    client's commands and the engine's script calls both go through a connection's
    send_command)."""
    sent: list[str] = []
    original = redis.connection.AbstractConnection.send_command

    def counting(self: Any, *args: Any, **options: Any) -> Any:
        sent.append(str(args[0]).upper())
        return original(self, *args, **options)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_command", counting)
    return sent


def _limits(world: World) -> None:
    world.limit(pool=world.pool, metric="tokens", amount=100_000)
    world.limit(pool=world.pool, metric="requests", amount=500)
    world.limit(tenant=world.tenant, feature=world.chat, metric="tokens", amount=50_000)
    world.limit(tenant=world.tenant, metric="tokens", window="day", amount=1_000_000)
    world.limit(tenant=world.tenant, metric="cost_usd", window="month", amount=100)
    world.limit(tenant=world.tenant, metric="concurrent", window="", amount=10)


def test_reserve_and_commit_each_take_one_redis_call_and_no_sql(
    world: World, reserve: Any, redis_commands: list[str], django_assert_num_queries: Any
) -> None:
    _limits(world)
    warm = reserve()  # loads the plan and the scripts
    assert warm.status_code == 201
    warm_done = world.client().post(
        f"/api/v1/reservations/{warm.json()['id']}/commit",
        {"input_tokens": 10, "output_tokens": 10},
        format="json",
    )
    assert warm_done.status_code == 200

    redis_commands.clear()
    with django_assert_num_queries(0):
        granted = reserve()
    assert granted.status_code == 201
    assert redis_commands == ["EVALSHA"]

    redis_commands.clear()
    with django_assert_num_queries(0):
        done = world.client().post(
            f"/api/v1/reservations/{granted.json()['id']}/commit",
            {"input_tokens": 10, "output_tokens": 10},
            format="json",
        )
    assert done.status_code == 200
    assert redis_commands == ["EVALSHA"]


def test_every_key_of_a_decision_carries_the_same_hash_tag(
    world: World, reserve: Any, redis_db: redis.Redis
) -> None:
    _limits(world)
    world.pool.protect = {"interactive": 0.3}
    world.pool.save()
    rid = reserve(idempotency_key="k1").json()["id"]
    world.client().post(
        f"/api/v1/reservations/{rid}/commit", {"input_tokens": 1, "output_tokens": 1}, format="json"
    )
    reserve(ttl_seconds=1)

    engine = get_engine()
    prefix = engine.tenant_space(world.tenant.id).prefix
    if not engine.partitioned:
        assert prefix == "q:{quota}:"
    # beside the decisions' keys, each partition keeps its copy of the configuration's
    # version and the allotments of the limits tenants share (tests.partitions claims them)
    kept = {key for space in engine.spaces for key in (space.version, space.allot)}
    keys = [k.decode() for k in redis_db.scan_iter(match="*")]  # a cluster's every master
    decisions = [k for k in keys if k not in kept and ":test_allot:" not in k]
    assert len(decisions) >= 6
    assert all(k.startswith(prefix) for k in decisions), keys


def test_a_saved_config_change_reaches_the_next_reservation_without_a_restart(
    world: World, reserve: Any, django_capture_on_commit_callbacks: Any
) -> None:
    assert reserve().status_code == 201
    loaded = plans.get()

    with django_capture_on_commit_callbacks(execute=True):
        world.chat.status = "paused"
        world.chat.save()

    refused = reserve()
    assert refused.status_code == 423
    assert refused.json()["error"] == "feature_paused"
    assert plans.get() is not loaded


def _minutes_pass(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The plan cache's clock jumps forward (checks are timed on time.monotonic)."""
    now = time.monotonic() + seconds
    monkeypatch.setattr(load.time, "monotonic", lambda: now)


def test_a_config_change_whose_redis_bump_was_lost_shows_within_a_minute(
    world: World,
    reserve: Any,
    django_capture_on_commit_callbacks: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert reserve().status_code == 201
    before = ConfigVersion.read()

    def lost(stored: int | None) -> None:
        raise redis.ConnectionError("blip")

    monkeypatch.setattr(signals, "config_version_bump", lost)
    with django_capture_on_commit_callbacks(execute=True):
        world.chat.status = "paused"
        world.chat.save()
    assert ConfigVersion.read() == before + 1  # the database's bump went through

    _minutes_pass(monkeypatch, load.RECHECK_SECONDS + 1)
    assert reserve().status_code == 201  # Redis still says the plan is current

    _minutes_pass(monkeypatch, load.STORED_RECHECK_SECONDS + 1)
    refused = reserve()
    assert refused.status_code == 423, refused.json()
    assert refused.json()["error"] == "feature_paused"


def test_a_plan_nothing_changed_is_kept_however_old(
    world: World, reserve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = plans.get()

    _minutes_pass(monkeypatch, 3600)

    assert reserve().status_code == 201
    assert plans.get() is loaded


def test_with_the_database_down_the_check_keeps_the_plan_and_says_so(
    world: World,
    reserve: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    loaded = plans.get()

    def down(cls: Any) -> int:
        raise OperationalError("connection refused")

    monkeypatch.setattr(ConfigVersion, "read", classmethod(down))
    _minutes_pass(monkeypatch, load.STORED_RECHECK_SECONDS + 1)

    assert reserve().status_code == 201
    assert plans.get() is loaded
    assert "could not read the config version from the database" in caplog.text


def test_a_rolled_back_change_leaves_both_versions_alone(
    world: World, redis_db: redis.Redis, django_capture_on_commit_callbacks: Any
) -> None:
    before, in_redis = ConfigVersion.read(), config_version_read()

    with (
        django_capture_on_commit_callbacks(execute=True) as due,
        pytest.raises(RuntimeError),
        transaction.atomic(),
    ):
        world.chat.status = "paused"
        world.chat.save()
        raise RuntimeError("rolled back")

    assert due == []
    assert (ConfigVersion.read(), config_version_read()) == (before, in_redis)


def test_a_transaction_that_saves_many_objects_bumps_once(
    world: World, redis_db: redis.Redis, django_capture_on_commit_callbacks: Any
) -> None:
    before, in_redis = ConfigVersion.read(), config_version_read() or 0

    with django_capture_on_commit_callbacks(execute=True) as due, transaction.atomic():
        for metric, window in (("tokens", "minute"), ("tokens", "day"), ("requests", "minute")):
            world.limit(
                tenant=world.tenant, feature=world.chat, metric=metric, window=window, amount=1_000
            )
        world.chat.pools.remove(world.pool)
        world.chat.save()

    assert len(due) >= 5  # every save asked
    assert (ConfigVersion.read(), config_version_read()) == (before + 1, in_redis + 1)

    with django_capture_on_commit_callbacks(execute=True):
        world.batch.save()  # the next transaction bumps again
    assert (ConfigVersion.read(), config_version_read()) == (before + 2, in_redis + 2)


def test_a_bump_rolled_back_with_its_savepoint_is_registered_again(
    world: World, redis_db: redis.Redis, django_capture_on_commit_callbacks: Any
) -> None:
    before, in_redis = ConfigVersion.read(), config_version_read() or 0

    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        with pytest.raises(RuntimeError), transaction.atomic():
            world.chat.status = "paused"
            world.chat.save()
            raise RuntimeError("rolled back to the savepoint")
        world.batch.status = "paused"
        world.batch.save()

    assert (ConfigVersion.read(), config_version_read()) == (before + 1, in_redis + 1)


def test_the_minute_check_is_made_by_one_request_while_others_arrive(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    plans.get()
    reads: list[int] = []

    def read_while_another_request_arrives(cls: Any) -> int:
        reads.append(1)
        plans.get()  # another request, while this one waits for the database
        return plans.get().stored_version

    monkeypatch.setattr(ConfigVersion, "read", classmethod(read_while_another_request_arrives))
    _minutes_pass(monkeypatch, load.STORED_RECHECK_SECONDS + 1)

    plans.get()

    assert reads == [1]


@pytest.mark.skipif(
    settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"),
    reason="SQLite lets one writer in at a time whatever the rows; PostgreSQL locks rows",
)
@pytest.mark.django_db(transaction=True)
def test_a_long_config_transaction_does_not_hold_up_another_change(world: World) -> None:
    """Bumping the version row inside each change's transaction held its lock until commit:
    every other config write waited behind it, and two could deadlock."""
    before = ConfigVersion.read()
    other_done = threading.Event()
    errors: list[BaseException] = []

    def other_change() -> None:
        try:
            feature = Feature.objects.get(pk=world.batch.pk)
            feature.status = "paused"
            feature.save()
            other_done.set()
        except BaseException as error:
            errors.append(error)
        finally:
            connection.close()

    with transaction.atomic():
        world.chat.status = "paused"
        world.chat.save()
        other = threading.Thread(target=other_change)
        other.start()
        finished_inside = other_done.wait(timeout=30)
    other.join()

    assert errors == []
    assert finished_inside  # it committed while the long transaction was still open
    assert ConfigVersion.read() == before + 2  # both changes, each after its commit


@pytest.mark.django_db(transaction=True)
def test_the_version_row_comes_back_when_a_flush_removed_it(world: World) -> None:
    ConfigVersion.objects.all().delete()

    world.chat.save()
    world.batch.save()

    assert ConfigVersion.read() == 2


def test_a_plan_that_cannot_load_answers_503_not_500(
    world: World, reserve: Any, redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert reserve().status_code == 201
    config_version_bump(1)  # a change elsewhere: this plan is stale, and must be reloaded

    def down() -> None:
        raise OperationalError("connection refused")

    monkeypatch.setattr(load, "plan_load", down)
    refused = reserve()

    assert refused.status_code == 503
    assert refused.json()["error"] == "unavailable"
    assert "database" in refused.json()["message"]
    assert refused["Retry-After"] == "5"


# -- following the provider: reports at commit and release, adaptive pools, the breaker -----


def _settle(world: World, rid: str, action: str, **body: Any) -> Any:
    return world.client().post(f"/api/v1/reservations/{rid}/{action}", body, format="json")


def _pool_limit(answer: dict[str, Any], metric: str) -> dict[str, Any]:
    return next(
        lim for lim in answer["limits"] if lim["scope"].get("pool") and lim["metric"] == metric
    )


def test_a_released_provider_429_adapts_the_pool_and_the_answer_shows_it(
    world: World, reserve: Any
) -> None:
    world.pool.backpressure = {"adaptive": True}
    world.pool.save()
    _limits(world)
    first = reserve()
    assert first.status_code == 201
    shown = _pool_limit(first.json(), "tokens")
    assert (shown["limit"], shown["configured"], shown["adapted"]) == (100_000, 100_000, False)
    feature_limit = next(lim for lim in first.json()["limits"] if lim["scope"].get("feature"))
    assert "configured" not in feature_limit and "adapted" not in feature_limit

    released = _settle(
        world,
        first.json()["id"],
        "release",
        upstream_status=429,
        latency_ms=40,
        upstream_headers={"retry-after": "2", "x-ratelimit-remaining-tokens": "oops"},
    )
    assert released.status_code == 200, released.content
    assert reserve().json()["error"] == "rate_limited"  # the 429 emptied the pool's buckets

    get_engine().clock_offset_ms += 30_000  # half a minute's refill at the adapted rate
    shown = _pool_limit(reserve().json(), "tokens")
    assert (shown["limit"], shown["configured"], shown["adapted"]) == (70_000, 100_000, True)
    assert _pool_limit(reserve().json(), "requests")["limit"] == 350


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-ratelimit-remaining-tokens": {"nested": [1, 2]}},
        {"x-ratelimit-reset-tokens": "\x00\x07", "anthropic-ratelimit-tokens-reset": "yesterday"},
        {f"h{i}": "x" * 500 for i in range(300)},
        {"x-ratelimit-limit-tokens": -1, "x-ratelimit-remaining-tokens": 1e308},
    ],
)
def test_malformed_upstream_headers_are_ignored(
    world: World, reserve: Any, headers: dict[str, Any]
) -> None:
    _limits(world)
    rid = reserve().json()["id"]

    done = _settle(
        world,
        rid,
        "commit",
        input_tokens=10,
        output_tokens=10,
        upstream_status=200,
        upstream_headers=headers,
    )

    assert done.status_code == 200, done.content
    assert _pool_limit(reserve().json(), "tokens")["remaining"] > 90_000


def test_an_open_breaker_fails_over_then_answers_503_upstream_unavailable(
    world: World, reserve: Any
) -> None:
    from tests.factories import PoolFactory

    world.pool.backpressure = {"breaker_min_calls": 2, "breaker_open_seconds": 30}
    world.pool.position = 0
    world.pool.save()
    spare = PoolFactory(slug="spare", provider=world.pool.provider, served_models=[world.model])
    spare.position = 1
    spare.save()
    world.limit(pool=world.pool, metric="tokens", amount=100_000)
    world.limit(pool=spare, metric="tokens", amount=100_000)
    for status in (502, 0):
        held = reserve()
        assert held.json()["pool"] == "shared"
        assert (
            _settle(world, held.json()["id"], "release", upstream_status=status).status_code == 200
        )

    moved = reserve()
    assert moved.status_code == 201
    assert moved.json()["pool"] == "spare"
    (note,) = moved.json()["breaker"]
    assert (note["pool"], note["state"]) == ("shared", "open")
    assert 0 < note["retry_after_ms"] <= 30_000

    only = reserve(pool="shared")
    assert only.status_code == 503
    body = only.json()
    assert (body["error"], body["pool"]) == ("upstream_unavailable", "shared")
    assert 1 <= int(only["Retry-After"]) <= 30
