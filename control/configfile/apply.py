"""Writes a parsed config file through the services: providers and their models, pools,
tenants with their owners and features; limits follow in `apply_limits`, alert channels in
`alerts`, both using the `Applier` of this module.

Every entry is attempted even after another failed, so that one run lists every error; the
caller rolls the whole transaction back if there was any. An entry that fails is remembered,
and entries that refer to it are skipped quietly: its own error already says what to fix,
and "no tenant 'acme'" after "tenants[0].timezone: ..." would only mislead. An entry with
some names missing from a list (a pool's models, a tenant's owners) is still written with
the rest, so that its other errors show in the same run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from typing import TYPE_CHECKING, Any, TypeVar

from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.db import models

from control.configfile.report import Change, Report
from control.configfile.schema import Entry, Errors
from providers.models import LanguageModel, Pool, Provider
from providers.services import language_model_upsert, pool_upsert, provider_upsert
from tenants.models import Feature, Tenant
from tenants.services import Upserted, feature_upsert, owner_get_or_create, tenant_upsert

if TYPE_CHECKING:
    from django.contrib.auth.models import User

M = TypeVar("M", bound=models.Model)
T = TypeVar("T")

# Model field -> key in the file, relative to the entry, where they differ ("" is the entry).
POOL_KEYS = {"served_models": "models"}


class Skip(Exception):
    """An entry cannot be written; its error has been recorded already (or belongs to another)."""


class Applier:
    def __init__(self, errors: Errors, report: Report) -> None:
        self.errors = errors
        self.report = report
        self.failed: set[tuple[str, Any]] = set()
        self.declared: dict[tuple[str, Any], str] = {}
        self.owners: dict[str, User] = {}
        # objects looked up by name, once each: a file names its tenants, features and pools
        # again in every limit (looked up after all of them are written)
        self.looked_up: dict[tuple[str, Any], Any] = {}

    def run(self, document: Mapping[str, list[Entry]]) -> None:
        """The sections everything else names: providers, pools, tenants with features.
        Limits (`apply_limits`) and alert channels (`alerts`) build on this module and are
        written after it, by `config_apply`."""
        for entry in document["providers"]:
            self.provider(entry)
        for index, entry in enumerate(document["pools"]):
            self.pool(entry, position=index)
        for entry in document["tenants"]:
            self.tenant(entry)

    # Writing and reporting.

    def write(
        self,
        kind: str,
        key: Any,
        path: str,
        upsert: Callable[[], Upserted[M]],
        keys: Mapping[str, str] | None = None,
    ) -> M | None:
        result = self.attempt(kind, key, path, upsert, keys)
        if result is None:
            return None
        self.record(kind, result, keys, str(result.obj))
        return result.obj

    def attempt(
        self,
        kind: str,
        key: Any,
        path: str,
        upsert: Callable[[], Upserted[M]],
        keys: Mapping[str, str] | None = None,
    ) -> Upserted[M] | None:
        """Runs one service call; its ValidationError becomes errors at their paths."""
        try:
            return upsert()
        except ValidationError as error:
            self.refuse(error, path, keys or {})
            self.failed.add((kind, key))
            return None

    def record(
        self, kind: str, result: Upserted[Any], keys: Mapping[str, str] | None, label: str
    ) -> None:
        changed = tuple(_key(keys or {}, name) for name in result.changed)
        self.report.add(Change(result.action, kind, label, changed))

    def refuse(self, error: ValidationError, path: str, keys: Mapping[str, str]) -> None:
        """Records a model's ValidationError at the paths in the file its fields came from."""
        if not hasattr(error, "error_dict"):
            for message in error.messages:
                self.errors.add(path, message)
            return
        for field, messages in error.message_dict.items():
            key = "" if field == NON_FIELD_ERRORS else _key(keys, field)
            for message in messages:
                self.errors.add(f"{path}.{key}" if key else path, message)

    def declare(self, kind: str, key: Any, path: str, what: str) -> None:
        """Refuses a second entry for the same object: which one should win is a guess."""
        first = self.declared.setdefault((kind, key), path)
        if first != path:
            self.errors.add(path, f"{what} is declared twice (first at {first})")
            raise Skip

    def skip(self, kind: str, key: Any, path: str) -> None:
        """Marks an entry's object as failed, unless the entry only repeated another's."""
        if self.declared.get((kind, key), path) == path:
            self.failed.add((kind, key))

    # Looking things up.

    def find(self, kind: str, key: Any, path: str, obj: models.Model | None, missing: str) -> Any:
        if (kind, key) in self.failed:
            raise Skip
        if obj is None:
            self.errors.add(path, missing)
            raise Skip
        return obj

    def find_each(self, names: Iterable[str], path: str, find: Callable[[str, str], T]) -> list[T]:
        """The names that exist; each missing one is recorded, not only the first.

        The entry is written with what was found, so that its own errors show in this run
        too; the run fails anyway.
        """
        found = []
        for index, name in enumerate(names):
            with suppress(Skip):
                found.append(find(name, f"{path}[{index}]"))
        return found

    def look_up(self, kind: str, key: Any, query: Callable[[], M | None]) -> M | None:
        """The object of that kind and key, or None; the database is asked once per run."""
        if (kind, key) not in self.looked_up:
            self.looked_up[(kind, key)] = query()
        return self.looked_up[(kind, key)]

    def provider_named(self, slug: str, path: str) -> Provider:
        obj = self.look_up("provider", slug, Provider.objects.filter(slug=slug).first)
        return self.find("provider", slug, path, obj, f"no provider '{slug}'")

    def model_of(self, provider: Provider, name: str, path: str) -> LanguageModel:
        key = (provider.slug, name)
        query = LanguageModel.objects.filter(provider=provider, name=name).first
        missing = f"provider '{provider.slug}' has no model '{name}'"
        return self.find("model", key, path, self.look_up("model", key, query), missing)

    def pool_named(self, slug: str, path: str) -> Pool:
        obj = self.look_up("pool", slug, Pool.objects.filter(slug=slug).first)
        return self.find("pool", slug, path, obj, f"no pool '{slug}'")

    def tenant_named(self, slug: str, path: str) -> Tenant:
        obj = self.look_up("tenant", slug, Tenant.objects.filter(slug=slug).first)
        return self.find("tenant", slug, path, obj, f"no tenant '{slug}'")

    def feature_of(self, tenant: Tenant, slug: str, path: str) -> Feature:
        key = (tenant.slug, slug)
        query = Feature.objects.filter(tenant=tenant, slug=slug).first
        missing = f"no feature '{slug}' in tenant '{tenant.slug}'"
        return self.find("feature", key, path, self.look_up("feature", key, query), missing)

    def owner(self, email: str, path: str) -> User:
        if ("owner", email) in self.failed:
            raise Skip
        if email not in self.owners:
            try:
                result = owner_get_or_create(email=email)
            except ValidationError as error:
                self.refuse(error, path, {"email": ""})
                self.failed.add(("owner", email))
                raise Skip from None
            self.owners[email] = result.obj
            self.report.add(Change(result.action, "owner", email))
        return self.owners[email]

    # The entries.

    def provider(self, entry: Entry) -> None:
        slug = entry.data.get("slug")
        try:
            if not entry.valid:
                raise Skip
            self.declare("provider", slug, entry.path, f"provider '{slug}'")
        except Skip:
            self.skip("provider", slug, entry.path)
            return
        values = {k: v for k, v in entry.data.items() if k != "models"}
        provider = self.write("provider", slug, entry.path, lambda: provider_upsert(**values))
        if provider is not None:
            for model_entry in entry.data.get("models", []):
                self.language_model(provider, model_entry)

    def language_model(self, provider: Provider, entry: Entry) -> None:
        key = (provider.slug, entry.data.get("name"))
        try:
            if not entry.valid:
                raise Skip
            self.declare("model", key, entry.path, f"model '{key[1]}'")
        except Skip:
            self.skip("model", key, entry.path)
            return
        values = {"provider": provider, **entry.data}
        self.write("model", key, entry.path, lambda: language_model_upsert(**values))

    def pool(self, entry: Entry, *, position: int) -> None:
        slug = entry.data.get("slug")
        try:
            if not entry.valid:
                raise Skip
            self.declare("pool", slug, entry.path, f"pool '{slug}'")
            provider = self.provider_named(entry.data["provider"], f"{entry.path}.provider")
            served = self.find_each(
                entry.data.get("models", []),
                f"{entry.path}.models",
                lambda name, path: self.model_of(provider, name, path),
            )
        except Skip:
            self.skip("pool", slug, entry.path)
            return
        values = {k: v for k, v in entry.data.items() if k != "models"}
        values.update(provider=provider, served_models=served)
        values.setdefault("position", position)  # the order in the file, unless given
        self.write("pool", slug, entry.path, lambda: pool_upsert(**values), POOL_KEYS)

    def tenant(self, entry: Entry) -> None:
        slug = entry.data.get("slug")
        try:
            if not entry.valid:
                raise Skip
            self.declare("tenant", slug, entry.path, f"tenant '{slug}'")
            owners = self.find_each(
                entry.data.get("owners", []), f"{entry.path}.owners", self.owner
            )
        except Skip:
            self.skip("tenant", slug, entry.path)
            return
        values = {k: v for k, v in entry.data.items() if k != "features"}
        values["owners"] = owners
        tenant = self.write("tenant", slug, entry.path, lambda: tenant_upsert(**values))
        if tenant is not None:
            for feature_entry in entry.data.get("features", []):
                self.feature(tenant, feature_entry)

    def feature(self, tenant: Tenant, entry: Entry) -> None:
        key = (tenant.slug, entry.data.get("slug"))
        try:
            if not entry.valid:
                raise Skip
            self.declare("feature", key, entry.path, f"feature '{key[1]}'")
            owner = self.owner(entry.data["owner"], f"{entry.path}.owner")
            pools = self.find_each(
                entry.data.get("pools", []), f"{entry.path}.pools", self.pool_named
            )
        except Skip:
            self.skip("feature", key, entry.path)
            return
        values = {**entry.data, "tenant": tenant, "owner": owner, "pools": pools}
        self.write("feature", key, entry.path, lambda: feature_upsert(**values))


def _key(keys: Mapping[str, str], field: str) -> str:
    return keys.get(field, field)
