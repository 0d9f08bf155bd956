"""Data migrations of the quotas app, run on the current schema."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
from django.apps import apps

from quotas import recovery
from quotas.models import ConfigVersion
from quotas.plan import plans
from quotas.store import config_version_key
from tests.fixtures import World

pytestmark = pytest.mark.django_db

at_least_one = importlib.import_module(
    "quotas.migrations.0006_config_version_at_least_one"
).at_least_one


def test_a_configured_install_at_version_zero_sees_a_lost_store_once_migrated(
    world: World, reserve: Any, redis_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.limit(tenant=world.tenant, metric="tokens", window="day", amount=5000)
    ConfigVersion.objects.update(number=0)  # configured before the row, never changed since
    redis_db.set(config_version_key(), 7)
    monkeypatch.setattr(recovery._Hooks, "rebuild_start", lambda: None)

    at_least_one(apps, None)
    redis_db.flushdb()  # the store lost its data
    plans.clear()  # a process started after the loss

    refused = reserve()
    assert refused.status_code == 503, refused.json()
    assert refused["Retry-After"] == "2"  # lost and being rebuilt, not merely unreachable
    assert ConfigVersion.read() == 1


def test_an_install_without_limits_keeps_its_version(world: World) -> None:
    ConfigVersion.objects.update(number=0)

    at_least_one(apps, None)

    assert ConfigVersion.read() == 0
