"""Writes to tenants, features and their owners.

Also home of `model_upsert`, the one way config objects are created or updated: it lives on
the ground floor so that `providers` and `quotas` can share it without importing upwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import models, transaction

from tenants.models import Feature, Priority, Tenant

if TYPE_CHECKING:
    from django.contrib.auth.models import User

M = TypeVar("M", bound=models.Model)
OWNER_GROUP = "Tenant owners"  # created by migration tenants 0002


@dataclass(frozen=True)
class Upserted(Generic[M]):
    """What an upsert did, so that `quota apply` can say it (and `--dry-run` can predict it)."""

    obj: M
    created: bool = False
    changed: tuple[str, ...] = ()  # fields whose stored value changed; empty when created

    @property
    def action(self) -> str:
        if self.created:
            return "created"
        return "updated" if self.changed else "unchanged"


@transaction.atomic
def model_upsert(
    model: type[M],
    *,
    lookup: Mapping[str, Any],
    values: Mapping[str, Any],
    m2m: Mapping[str, Iterable[models.Model]] | None = None,
) -> Upserted[M]:
    """Create or update the one row that `lookup` identifies, validated by `full_clean()`.

    Changes are measured after `full_clean()`, which may normalise values (sorted alert
    thresholds, decimals), so re-applying the same values reports nothing changed. An
    unchanged row is not saved: no history entry, no config-version bump.
    """
    obj = model._default_manager.filter(**lookup).first()
    created = obj is None
    if obj is None:
        obj = model(**lookup)
    before = {name: _stored(obj, name) for name in values}
    for name, value in values.items():
        setattr(obj, name, value)
    obj.full_clean()
    changed = [name for name in values if _stored(obj, name) != before[name]]
    if created or changed:
        obj.save()
    changed += _m2m_set(obj, m2m or {}, created=created)
    return Upserted(obj, created=created, changed=() if created else tuple(changed))


def _stored(obj: models.Model, name: str) -> Any:
    # Foreign keys compare by id: the related object itself may be a fresh instance.
    field = obj._meta.get_field(name)
    assert isinstance(field, models.Field), f"{name} is not a concrete field"
    return getattr(obj, field.attname)


def _m2m_set(
    obj: models.Model, m2m: Mapping[str, Iterable[models.Model]], *, created: bool
) -> list[str]:
    changed = []
    for name, items in m2m.items():
        wanted = list(items)
        manager = getattr(obj, name)
        current = set() if created else set(manager.values_list("pk", flat=True))
        if {item.pk for item in wanted} != current:
            manager.set(wanted)
            changed.append(name)
    return changed


def owner_get_or_create(*, email: str) -> Upserted[User]:
    """The staff user behind an owner's e-mail address, created (without a password) if missing.

    An existing user is used as it is: a config file is no place to change someone's account
    or privileges. Owners are found by username first (the convention is username = e-mail),
    then by a unique e-mail address.
    """
    try:
        validate_email(email)
    except ValidationError:
        raise ValidationError({"email": f"'{email}' is not an e-mail address"}) from None
    user_model = get_user_model()
    user = user_model.objects.filter(username=email).first()
    if user is None:
        matches = list(user_model.objects.filter(email__iexact=email)[:2])
        user = matches[0] if len(matches) == 1 else None
    if user is not None:
        return Upserted(user)
    user = user_model(username=email, email=email, is_staff=True)
    user.set_unusable_password()
    user.full_clean()
    user.save()
    return Upserted(user, created=True)


def tenant_upsert(
    *,
    slug: str,
    name: str = "",
    timezone: str = "UTC",
    status: str = Tenant.Status.ACTIVE,
    owners: Iterable[User] = (),
) -> Upserted[Tenant]:
    owners = list(owners)
    upserted = model_upsert(
        Tenant,
        lookup={"slug": slug},
        values={"name": name, "timezone": timezone, "status": status},
        m2m={"owners": owners},
    )
    owners_admit(users=owners)
    return upserted


def owners_admit(*, users: Iterable[User]) -> None:
    """Tenant owners use the admin: they need the owner group's model permissions (which
    rows they see is decided by their tenants, in console.scoping)."""
    group = Group.objects.filter(name=OWNER_GROUP).first()
    if group is None:
        return
    for user in users:
        if user.pk is not None:
            user.groups.add(group)


def feature_upsert(
    *,
    tenant: Tenant,
    slug: str,
    owner: User,
    name: str = "",
    priority: str = Priority.STANDARD,
    status: str = Feature.Status.ACTIVE,
    pools: Iterable[models.Model] = (),  # providers' pools: that app is above this one
) -> Upserted[Feature]:
    return model_upsert(
        Feature,
        lookup={"tenant": tenant, "slug": slug},
        values={"owner": owner, "name": name, "priority": priority, "status": status},
        m2m={"pools": pools},
    )


def feature_status_set(*, feature: Feature, status: str) -> bool:
    """Pause or resume a feature: the kill switch. The save bumps the config version, so the
    next reservation of the feature anywhere sees it. Returns whether anything changed."""
    if status not in Feature.Status.values:
        raise ValueError(f"'{status}' is not a feature status")
    if feature.status == status:
        return False
    feature.status = status
    feature.save(update_fields=["status"])
    return True
