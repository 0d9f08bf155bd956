"""A limit's identity (scope, metric, window) is unique in the database, not only in forms."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.migrations.executor import MigrationExecutor

from quotas.models import Limit
from tests.fixtures import World

BEFORE = [("quotas", "0004_config_version")]


def test_a_second_limit_of_the_same_identity_is_refused_by_the_database(world: World) -> None:
    world.limit(feature=world.chat, tenant=world.tenant, metric="tokens", amount=100)
    twin = Limit(feature=world.chat, tenant=world.tenant, metric="tokens", window="minute")
    twin.amount = 200
    with pytest.raises(IntegrityError), transaction.atomic():
        twin.save()  # as a save racing past clean() would


def test_limits_differing_only_where_scope_is_missing_are_still_the_same(world: World) -> None:
    Limit.objects.create(pool=world.pool, metric="tokens", window="minute", amount=1)
    with pytest.raises(IntegrityError), transaction.atomic():
        Limit.objects.create(pool=world.pool, metric="tokens", window="minute", amount=2)
    Limit.objects.create(pool=world.pool, metric="tokens", window="day", amount=3)


def test_clean_names_the_duplicate_in_words_once(world: World) -> None:
    world.limit(pool=world.pool, metric="tokens", amount=100)
    twin = Limit(pool=world.pool, metric="tokens", window="minute", amount=5)
    with pytest.raises(ValidationError) as raised:
        twin.full_clean()
    assert raised.value.message_dict == {
        "metric": ["This scope already has a tokens per minute limit."]
    }


@pytest.mark.django_db(transaction=True)
def test_the_migration_names_existing_duplicates_and_adds_nothing(world: World) -> None:
    executor = MigrationExecutor(connection)
    latest = executor.loader.graph.leaf_nodes()
    executor.migrate(BEFORE)
    try:
        old = MigrationExecutor(connection).loader.project_state(BEFORE).apps
        OldLimit: Any = old.get_model("quotas", "Limit")
        for amount in (1, 2):
            OldLimit.objects.create(
                pool_id=world.pool.pk, metric="tokens", window="minute", amount=amount
            )
        with pytest.raises(RuntimeError, match=r"limits \d+, \d+: tenant=None feature=None"):
            MigrationExecutor(connection).migrate(latest)
        OldLimit.objects.filter(amount=2).delete()
    finally:
        MigrationExecutor(connection).migrate(latest)
    with pytest.raises(IntegrityError), transaction.atomic():
        Limit.objects.create(pool=world.pool, metric="tokens", window="minute", amount=2)
