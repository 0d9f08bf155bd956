"""Every saved change to the configuration bumps the config version, once its transaction
commits: in the database and in Redis, so that every web process reloads its in-process
plan."""

from __future__ import annotations

import logging
from typing import Any

import redis
from django.db import DatabaseError, transaction
from django.db.models.signals import m2m_changed, post_delete, post_save

from providers.models import LanguageModel, Pool, Provider
from quotas.models import ApiKey, ConfigVersion, Limit
from quotas.store import config_version_bump
from tenants.models import Feature, Tenant

log = logging.getLogger(__name__)

CONFIG_MODELS = (Tenant, Feature, Provider, LanguageModel, Pool, Limit, ApiKey)


class _Once:
    done = False


class _Bump:
    """A bump due when its transaction commits. Every save in one transaction registers one,
    and they all share one `_Once`: the first to run bumps, the others do nothing, so a
    transaction that saves thousands of objects (`quota apply`) bumps once. A savepoint rolled
    back takes its own registrations with it and leaves the others."""

    def __init__(self, once: _Once) -> None:
        self.once = once

    def __call__(self) -> None:
        if not self.once.done:
            self.once.done = True
            _bump_now()


def _bump_after_commit(**_: Any) -> None:
    pending = transaction.get_connection().run_on_commit
    latest = next((call for _, call, _ in reversed(pending) if isinstance(call, _Bump)), None)
    # a test may run a transaction's callbacks without ending it: a bump that has run is over
    once = latest.once if latest is not None and not latest.once.done else _Once()
    transaction.on_commit(_Bump(once))


def _bump_now() -> None:
    """In the database first, in a transaction of its own (bumping inside the change's
    transaction would hold the row's lock until it commits, so every other config write
    would wait for it, and two could deadlock), then in Redis."""
    stored = None
    try:
        stored = ConfigVersion.bump()
    except DatabaseError:
        log.warning("could not bump the config version in the database", exc_info=True)
    try:
        config_version_bump(stored)
    except redis.RedisError:
        # Processes also check the database's version every minute, so a missed bump delays a
        # change, never loses it.
        log.warning("could not bump the config version in Redis", exc_info=True)


for _model in CONFIG_MODELS:
    post_save.connect(
        _bump_after_commit, sender=_model, dispatch_uid=f"bump-save-{_model.__name__}"
    )
    post_delete.connect(
        _bump_after_commit, sender=_model, dispatch_uid=f"bump-delete-{_model.__name__}"
    )
for _through in (
    Tenant.owners.through,
    Feature.pools.through,
    Pool.served_models.through,
    ApiKey.features.through,
):
    m2m_changed.connect(_bump_after_commit, sender=_through, dispatch_uid=f"bump-m2m-{_through}")
