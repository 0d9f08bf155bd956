"""Redis loses everything mid-period; the ledger and the configuration put every calendar
budget and every open lease back (`quota rebuild`, or by itself once a decision finds the loss),
and hard limits hold afterwards."""

from __future__ import annotations

import json
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command

from ledger.models import UsageEvent
from ledger.reconcile import budgets_reconcile
from ledger.recovery import store_rebuild
from ledger.services import usage_ingest
from quotas import recovery
from quotas.engine import Engine
from quotas.engine.core import KeySpace
from quotas.keys import api_key_create
from quotas.models import ConfigVersion, Limit
from quotas.plan import plans
from quotas.reservations import get_engine, leases_expire
from quotas.store import config_version_bump, config_version_read
from tests.factories import TenantFactory
from tests.fixtures import World
from tests.ledger.partitions import shared_limit, space_of, tenant_elsewhere, three_partitions

pytestmark = pytest.mark.django_db
__all__ = ["three_partitions"]  # a fixture

HOUR_MS = 3_600_000


def partitions() -> int:
    return len(get_engine().spaces)


@pytest.fixture(autouse=True)
def mid_hour_clock() -> None:
    """The middle of the current hour: no period of any window ends during the test."""
    engine = get_engine()
    now = engine.now_ms()
    engine.frozen_ms = now - now % HOUR_MS + HOUR_MS // 2


def advance(seconds: float) -> None:
    engine = get_engine()
    assert engine.frozen_ms is not None
    engine.frozen_ms += int(seconds * 1000)


def state(limit: Limit) -> dict[str, Any]:
    """A limit as the world's tenant (acme) sees it: on its partition (of a limit shared by
    every tenant on a partitioned store, that partition's allotment)."""
    plan, engine = plans.get(), get_engine()
    acme = next(tenant.id for tenant in plan.tenants.values() if tenant.slug == "acme")
    space = engine.tenant_space(acme)
    check = plan.inspection_check(plan.limits[limit.id], space, engine.now_ms_estimate())
    return engine.inspect([check], space=space)[0]


def lease_key(rid: str) -> str:
    """A reservation's lease, on the partition its id names."""
    return get_engine().reservation_space(rid).lease(rid)


def lease_digest_of(client: Any, rid: str) -> str | None:
    """The API key's digest a lease recorded (see quotas.keys.lease_digest)."""
    digest: str | None = json.loads(client.get(lease_key(rid))).get("kd")
    return digest


def commit(world: World, rid: str, **usage: Any) -> Any:
    return world.client().post(f"/api/v1/reservations/{rid}/commit", usage, format="json")


def traffic(world: World, reserve: Any) -> list[str]:
    """Commits, a release, an expiry, a commit after expiry, and two reservations left held."""
    for n in range(3):
        rid = reserve(input_tokens=300 + n, max_output_tokens=200).json()["id"]
        assert commit(world, rid, input_tokens=250, output_tokens=50 + n).status_code == 200
    released = reserve(input_tokens=100, max_output_tokens=100).json()["id"]
    world.client().post(f"/api/v1/reservations/{released}/release")
    late = reserve(feature="batch", input_tokens=120, max_output_tokens=80, ttl_seconds=1)
    expired = reserve(feature="batch", input_tokens=70, max_output_tokens=30, ttl_seconds=1)
    assert late.status_code == expired.status_code == 201
    advance(2)
    assert leases_expire() == 2
    assert commit(world, late.json()["id"], input_tokens=100, output_tokens=11).status_code == 200
    return [reserve(input_tokens=400, max_output_tokens=100).json()["id"] for _ in range(2)]


def test_rebuild_after_a_wipe_restores_every_budget_and_open_lease(
    world: World, reserve: Any, redis_db: Any
) -> None:
    limits = [
        world.limit(tenant=world.tenant, metric="tokens", window="day", amount=5000),
        world.limit(
            tenant=world.tenant, feature=world.chat, metric="requests", window="hour", amount=20
        ),
        world.limit(tenant=world.tenant, metric="cost_usd", window="month", amount=1),
        world.limit(
            pool=world.pool,
            metric="input_tokens",
            window="day",
            amount=300 * partitions(),  # split on a partitioned store: 300 on each at least
            enforcement="soft",
        ),
        world.limit(
            tenant=world.tenant,
            feature=world.batch,
            metric="output_tokens",
            window="hour",
            amount=50,
            enforcement="shadow",
        ),
    ]
    slots = world.limit(pool=world.pool, metric="concurrent", window="", amount=4 * partitions())
    held = traffic(world, reserve)
    usage_ingest()
    # what each counter holds (of a limit split into allotments, on a partitioned store, the
    # allotment itself is the rebalancer's: lost with the data, it is not the ledger's)
    before = {limit.id: state(limit)["used"] for limit in limits}
    assert all(state(limit)["used"] > 0 for limit in limits)  # the traffic touched every one
    assert state(slots)["used"] == 2
    digests = {rid: lease_digest_of(redis_db, rid) for rid in held}

    redis_db.flushdb()  # Redis restarted without persistence
    plans.clear()
    assert all(state(limit)["used"] == 0 for limit in limits)
    out = StringIO()
    call_command("quota", "rebuild", stdout=out)

    assert {limit.id: state(limit)["used"] for limit in limits} == before
    assert state(slots)["used"] == 2
    assert "2 leases restored" in out.getvalue()
    # the key that made each may still settle it while the plan cannot be loaded
    assert {rid: lease_digest_of(redis_db, rid) for rid in held} == digests
    assert None not in digests.values()

    # a restored lease settles like the original: the unused part comes back
    day = limits[0]
    left = state(day)["remaining"]
    assert commit(world, held[0], input_tokens=400, output_tokens=20).status_code == 200
    assert state(day)["remaining"] == left + 80
    assert state(slots)["used"] == 1

    # and the hard limits hold: the day budget admits exactly what is left, then nothing
    left = int(state(day)["remaining"])
    assert reserve(input_tokens=left - 100, max_output_tokens=100).status_code == 201
    refused = reserve(input_tokens=1, max_output_tokens=1)
    assert refused.status_code == 429
    assert refused.json()["limit"]["id"] == day.id


def test_rebuild_twice_changes_nothing_the_second_time(
    world: World, reserve: Any, redis_db: Any
) -> None:
    day = world.limit(tenant=world.tenant, metric="tokens", window="day", amount=5000)
    traffic(world, reserve)
    usage_ingest()
    before = state(day)["remaining"]
    redis_db.flushdb()
    plans.clear()

    call_command("quota", "rebuild", stdout=StringIO())
    out = StringIO()
    call_command("quota", "rebuild", stdout=out)

    assert state(day)["remaining"] == before
    assert "0 moved; 0 leases restored, 2 already there" in out.getvalue()


def test_a_restored_lease_keeps_the_expiry_it_was_granted(
    world: World, reserve: Any, redis_db: Any
) -> None:
    slots = world.limit(pool=world.pool, metric="concurrent", window="", amount=4 * partitions())
    long_call = reserve(input_tokens=100, max_output_tokens=100, ttl_seconds=600).json()["id"]
    short_call = reserve(input_tokens=100, max_output_tokens=100, ttl_seconds=5).json()["id"]
    usage_ingest()
    redis_db.flushdb()
    plans.clear()
    advance(10)  # the short call's lease ran out while Redis was away

    call_command("quota", "rebuild", stdout=StringIO())
    assert state(slots)["used"] == 2

    advance(50)  # the short one still has its moment to commit (60 s from the rebuild)
    assert leases_expire() == 0
    advance(20)
    assert leases_expire() == 1  # the short one, charged as reserved
    assert state(slots)["used"] == 1

    advance(400)  # 480 s after the grant: the long one runs to its own expiry of 600 s
    assert leases_expire() == 0
    done = commit(world, long_call, input_tokens=100, output_tokens=10)
    assert done.status_code == 200, done.content
    assert done.json()["lease_expired"] is False
    assert state(slots)["used"] == 0
    late = commit(world, short_call, input_tokens=100, output_tokens=10)
    assert late.status_code == 200 and late.json()["lease_expired"] is True


def test_a_restored_lease_keeps_the_expiry_an_extension_granted(
    world: World, reserve: Any, redis_db: Any
) -> None:
    slots = world.limit(pool=world.pool, metric="concurrent", window="", amount=4 * partitions())
    rid = reserve(input_tokens=100, max_output_tokens=100, ttl_seconds=30).json()["id"]
    advance(20)
    extended = world.client().post(
        f"/api/v1/reservations/{rid}/extend", {"ttl_seconds": 900}, format="json"
    )
    assert extended.status_code == 200
    usage_ingest()
    redis_db.flushdb()
    plans.clear()

    call_command("quota", "rebuild", stdout=StringIO())
    advance(600)  # long past the 30 s first granted and the 60 s a rebuild grants at least

    assert leases_expire() == 0
    assert state(slots)["used"] == 1
    done = commit(world, rid, input_tokens=100, output_tokens=10)
    assert done.status_code == 200, done.content
    assert done.json()["lease_expired"] is False


# -- a store that lost its data, found by the first decision ---------------------------------


@pytest.fixture
def deployed(world: World, redis_db: Any) -> None:
    """A configured deployment: the database's config version and the store's both set (the
    test transaction runs no on-commit bumps of its own)."""
    ConfigVersion.bump()
    config_version_bump(1)
    plans.clear()


def test_a_lost_store_refuses_then_rebuilds_itself_and_never_readmits_a_spent_budget(
    world: World, reserve: Any, redis_db: Any, deployed: None
) -> None:
    day = world.limit(tenant=world.tenant, metric="tokens", window="day", amount=5000)
    traffic(world, reserve)
    usage_ingest()
    left = state(day)["remaining"]
    assert 0 < left < 5000

    redis_db.flushdb()  # Redis restarted without persistence; the process keeps its plan
    refused = reserve(input_tokens=100, max_output_tokens=100)
    assert refused.status_code == 503, refused.json()
    assert refused.json()["error"] == "unavailable"
    assert refused["Retry-After"] == "2"

    # the rebuild ran (eagerly here, a Celery task in production) and wrote the version back
    assert config_version_read() is not None
    assert not redis_db.exists(get_engine().keys.rebuild_lock)
    assert state(day)["remaining"] == left
    too_much = reserve(input_tokens=left, max_output_tokens=1)
    assert too_much.status_code == 429
    assert too_much.json()["error"] == "budget_exhausted"
    assert store_rebuild() is None  # a second run finds nothing to do


def test_a_process_started_after_the_loss_sees_it_too(
    world: World, reserve: Any, redis_db: Any, deployed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[int] = []
    monkeypatch.setattr(recovery._Hooks, "rebuild_start", lambda: started.append(1))
    redis_db.flushdb()
    plans.clear()  # a fresh process: its plan is loaded from a store without a version

    assert reserve().status_code == 503
    assert [reserve().status_code for _ in range(3)] == [503] * 3
    assert started == [1]  # one rebuild started, however many decisions saw the loss


def test_a_config_change_before_the_rebuild_does_not_hide_the_loss(
    world: World, reserve: Any, redis_db: Any, deployed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recovery._Hooks, "rebuild_start", lambda: None)
    redis_db.flushdb()
    config_version_bump(ConfigVersion.bump())

    assert config_version_read() is None
    assert reserve().status_code == 503


def test_a_fail_open_pool_admits_degraded_while_the_store_is_rebuilt(
    world: World, reserve: Any, redis_db: Any, deployed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.pool.fail_mode = "open"
    world.pool.save()
    plans.clear()
    monkeypatch.setattr(recovery._Hooks, "rebuild_start", lambda: None)
    redis_db.flushdb()

    admitted = reserve()
    assert admitted.status_code == 201, admitted.json()
    assert admitted.json()["degraded"] is True


def test_commits_of_reservations_the_store_lost_are_accepted_and_charged(
    world: World, reserve: Any, redis_db: Any, deployed: None
) -> None:
    day = world.limit(tenant=world.tenant, metric="tokens", window="day", amount=5000)
    held = reserve(input_tokens=400, max_output_tokens=100).json()["id"]
    late = reserve(input_tokens=300, max_output_tokens=100, ttl_seconds=1).json()["id"]
    advance(2)
    assert leases_expire() == 1
    usage_ingest()
    redis_db.flushdb()
    assert reserve().status_code == 503  # the loss is seen, the store rebuilt
    rebuilt = state(day)["remaining"]
    assert rebuilt == 5000 - 500 - 400

    assert commit(world, held, input_tokens=400, output_tokens=20).status_code == 200
    redis_db.delete(lease_key(late))  # gone with the data; the ledger has it
    accepted = commit(world, late, input_tokens=300, output_tokens=10)
    assert accepted.status_code == 200, accepted.json()
    assert accepted.json()["lease_expired"] is True
    assert state(day)["remaining"] == rebuilt + 80 + 90

    other = TenantFactory(slug="other")
    stranger = world.client(api_key_create(tenant=other, name="x").secret)
    plans.clear()
    redis_db.delete(lease_key(held))
    body = {"input_tokens": 1, "output_tokens": 1}
    answer = stranger.post(f"/api/v1/reservations/{held}/commit", body, format="json")
    assert answer.status_code == 404


def _committed_twice_if_restored(world: World, reserve: Any, redis_db: Any) -> tuple[str, Any]:
    """A reservation committed after the ledger saw it held, whose settled record expired:
    the ledger, lagging, still says held."""
    rid = reserve(input_tokens=400, max_output_tokens=100).json()["id"]
    usage_ingest()
    assert commit(world, rid, input_tokens=400, output_tokens=20).status_code == 200
    redis_db.delete(lease_key(rid))
    return rid, redis_db.xlen(space_of(world).events)


def test_a_missing_reservation_of_a_store_never_rebuilt_is_not_restored(
    world: World,
    reserve: Any,
    redis_db: Any,
    deployed: None,
    django_assert_num_queries: Any,
) -> None:
    day = world.limit(tenant=world.tenant, metric="tokens", window="day", amount=5000)
    rid, events = _committed_twice_if_restored(world, reserve, redis_db)
    left = state(day)["remaining"]

    with django_assert_num_queries(0):  # nor is the ledger asked
        again = commit(world, rid, input_tokens=400, output_tokens=20)

    assert again.status_code == 404, again.json()
    assert state(day)["remaining"] == left
    assert redis_db.xlen(space_of(world).events) == events


def test_only_reservations_made_before_the_last_rebuild_are_restored(
    world: World, reserve: Any, redis_db: Any, deployed: None
) -> None:
    day = world.limit(tenant=world.tenant, metric="tokens", window="day", amount=5000)
    before = reserve(input_tokens=300, max_output_tokens=100).json()["id"]
    advance(1)
    store_rebuild(force=True)
    advance(1)
    rid, events = _committed_twice_if_restored(world, reserve, redis_db)
    left = state(day)["remaining"]

    assert commit(world, rid, input_tokens=400, output_tokens=20).status_code == 404
    assert state(day)["remaining"] == left
    assert redis_db.xlen(space_of(world).events) == events

    usage_ingest()
    redis_db.delete(lease_key(before))  # lost with the data before the rebuild
    restored = commit(world, before, input_tokens=300, output_tokens=10)
    assert restored.status_code == 200, restored.json()
    assert state(day)["remaining"] == left + 90


def test_a_rebuild_with_nothing_to_do_frees_the_lock(
    world: World, redis_db: Any, deployed: None
) -> None:
    engine = get_engine()
    redis_db.set(engine.keys.rebuild_lock, "another-process", px=60_000)

    assert store_rebuild() is None
    assert not redis_db.exists(engine.keys.rebuild_lock)


def test_a_loss_seen_just_before_a_rebuild_finished_starts_no_other(
    world: World, redis_db: Any, deployed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decision answered `lost` before the rebuild wrote the version back, and its process
    reaches the (now free) lock after it: the store is whole again, nothing is started."""
    started: list[int] = []
    monkeypatch.setattr(recovery._Hooks, "rebuild_start", lambda: started.append(1))

    recovery.store_lost()

    assert started == []
    assert not redis_db.exists(get_engine().keys.rebuild_lock)


# -- a partitioned store: one partition lost ---------------------------------------------------


def partition_dump(client: Any, space: KeySpace) -> dict[bytes, Any]:
    """Every key of a partition and its value (a stream's entries), its config version and
    consumer groups aside."""
    dump: dict[bytes, Any] = {}
    for key in client.scan_iter(match=space.prefix.replace("{", "[{]") + "*", count=1000):
        if key == space.version.encode():
            continue
        if key == space.events.encode():
            dump[key] = client.xrange(key)
        else:
            dump[key] = client.dump(key)
    return dump


def test_a_lost_partition_alone_is_rebuilt_and_the_others_are_left_as_they_were(
    three_partitions: Engine, world: World, reserve: Any, redis_db: Any, deployed: None
) -> None:
    """Two tenants on two partitions, each with a day budget, a day budget shared by every
    tenant (split: a counter on each partition) and held reservations. The keys of the first
    tenant's partition are deleted (its shard lost its data): its next decision sees the loss,
    and that partition alone is rebuilt from the ledger's rows of its own tenants, with its
    leases; every other partition keeps every key as it was, and goes on deciding."""
    engine = three_partitions
    other, other_client = tenant_elsewhere(world, "globex")
    ours, theirs = space_of(world), engine.tenant_space(other.id)
    day = world.limit(tenant=world.tenant, metric="tokens", window="day", amount=5000)
    world.limit(tenant=other, metric="tokens", window="day", amount=5000)
    shared = shared_limit(pool=world.pool, metric="tokens", window="day", amount=30_000)
    plans.clear()
    held = traffic(world, reserve)
    their_held = [reserve(client=other_client, input_tokens=700).json()["id"] for _ in range(2)]
    assert all(rid.startswith(f"rsv_{theirs.index:02x}") for rid in their_held)
    usage_ingest()
    before = {limit.id: state(limit)["used"] for limit in (day, shared)}
    assert before[shared.id] == before[day.id] > 0  # on acme's partition: acme's usage alone
    kept = {space.index: partition_dump(redis_db, space) for space in engine.spaces}
    assert kept[theirs.index] and all(redis_db.exists(theirs.lease(rid)) for rid in their_held)

    for key in redis_db.scan_iter(match=ours.prefix.replace("{", "[{]") + "*"):
        redis_db.delete(key)  # its shard lost its data
    assert reserve().status_code == 503  # this one's decisions see the loss: rebuilt

    assert redis_db.exists(ours.version) and redis_db.exists(ours.rebuilt_at)
    assert {limit.id: state(limit)["used"] for limit in (day, shared)} == before
    assert all(redis_db.exists(ours.lease(rid)) for rid in held)
    for space in engine.spaces:
        if space is not ours:
            assert partition_dump(redis_db, space) == kept[space.index]
            assert not redis_db.exists(space.rebuilt_at)
    assert reserve(client=other_client).status_code == 201
    assert commit(world, held[0], input_tokens=400, output_tokens=20).status_code == 200
    assert reserve().status_code == 201


def test_a_held_reservation_made_under_another_number_of_partitions_is_not_restored_elsewhere(
    three_partitions: Engine, world: World, reserve: Any, redis_db: Any
) -> None:
    """A reservation whose id names another partition than its tenant's (made before
    QUOTA_PARTITIONS changed) gets no lease on the rebuild: restored where its id points, its
    keys would be another partition's, and its settlement would refund the wrong counters.
    The repair charges it in full on its tenant's partition; the other partitions' keys are
    left as they were."""
    engine = three_partitions
    ours = space_of(world)
    elsewhere = next(space for space in engine.spaces if space is not ours)
    day = world.limit(tenant=world.tenant, metric="tokens", window="day", amount=5000)
    made = reserve(input_tokens=400, max_output_tokens=100).json()["id"]
    usage_ingest()
    renamed = f"rsv_{elsewhere.index:02x}{made[6:]}"
    UsageEvent.objects.filter(rid=made).update(rid=renamed)
    redis_db.delete(ours.lease(made))
    kept = partition_dump(redis_db, elsewhere)

    report = budgets_reconcile(repair=True, restore_leases=True)

    assert report.leases_restored == 0
    assert not any(redis_db.exists(space.lease(renamed)) for space in engine.spaces)
    assert partition_dump(redis_db, elsewhere) == kept
    assert state(day)["used"] == 500  # reserved, charged on the tenant's partition
