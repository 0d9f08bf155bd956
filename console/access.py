"""Who may use the admin, and what kind of row they may touch: derived from ownership.

Naming someone a tenant's owner or a feature's owner is the one step that lets them in: they
need no staff flag, no group and no permission of their own. The admin site lets in active
users who are staff or own something (`ConsoleAdminSite.has_permission`), and this
authentication backend grants owners the model permissions their ownership implies, with the
least that serves: a feature owner sees their feature's live state, pauses it, boosts its
limits and revokes its keys; a tenant owner also configures the whole tenant. *Which* rows
either may reach is `console.scoping`'s rule. Removing someone as owner takes it all back.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import get_user_model
from django.contrib.auth.backends import BaseBackend
from django.contrib.auth.forms import PasswordResetForm

from console.scoping import owned_features, owned_tenants

if TYPE_CHECKING:
    from django.contrib.auth.base_user import AbstractBaseUser
    from django.contrib.auth.models import AnonymousUser

ALL = ("view", "add", "change", "delete")
SEEN = ("view",)


def _perms(grants: dict[str, tuple[str, ...]]) -> frozenset[str]:
    """{"app.model": actions} as Django's "app.action_model" strings."""
    perms: set[str] = set()
    for label, actions in grants.items():
        app, model = label.split(".")
        perms.update(f"{app}.{action}_{model}" for action in actions)
    return frozenset(perms)


# Shared infrastructure and every history page: read-only for every owner.
_READ = {
    "providers.provider": SEEN,
    "providers.languagemodel": SEEN,
    "providers.pool": SEEN,
    **dict.fromkeys(
        [
            "tenants.historicalfeature",
            "quotas.historicallimit",
            "quotas.historicalapikey",
            "providers.historicalprovider",
            "providers.historicallanguagemodel",
            "providers.historicalpool",
        ],
        SEEN,
    ),
    "alerts.alert": SEEN,
    "alerts.notification": SEEN,
    "alerts.delivery": SEEN,
}
# "change" on a feature, a limit or a key is what pausing, boosting and revoking need; the
# forms show a feature owner the configuration read-only (`scoping.may_manage`).
FEATURE_OWNER = _perms(
    {
        **_READ,
        "tenants.feature": ("view", "change"),
        "quotas.limit": ("view", "change"),
        "quotas.apikey": ("view", "change"),
    }
)
TENANT_OWNER = FEATURE_OWNER | _perms(
    {
        "tenants.tenant": ("view", "change"),
        "tenants.historicaltenant": SEEN,
        "tenants.feature": ALL,
        "quotas.limit": ALL,
        "quotas.apikey": ALL,
        "alerts.channel": ALL,
        "alerts.alertrule": ALL,
    }
)


def owner_permissions(user: AbstractBaseUser | AnonymousUser) -> frozenset[str]:
    """The permissions `user`'s ownership implies (cached on the user object, which lives for
    one request)."""
    if not user.is_active or not user.is_authenticated:
        return frozenset()
    cached: frozenset[str] | None = getattr(user, "_owner_perm_cache", None)
    if cached is None:
        if owned_tenants(user).exists():
            cached = TENANT_OWNER
        elif owned_features(user).exists():
            cached = FEATURE_OWNER
        else:
            cached = frozenset()
        user._owner_perm_cache = cached  # type: ignore[union-attr,attr-defined]
    return cached


class OwnerPermissions(BaseBackend):
    """Authenticates no one (ModelBackend does that); answers permission checks for owners."""

    def get_all_permissions(
        self, user_obj: AbstractBaseUser | AnonymousUser, obj: Any = None
    ) -> set[str]:
        return set(owner_permissions(user_obj)) if obj is None else set()

    def has_module_perms(self, user_obj: AbstractBaseUser | AnonymousUser, app_label: str) -> bool:
        return any(perm.startswith(f"{app_label}.") for perm in owner_permissions(user_obj))


class OwnerPasswordResetForm(PasswordResetForm):
    """Django's reset form, which also reaches owners who never had a password: an owner
    made from the config file (or named in the admin) sets their first one this way."""

    def get_users(self, email: str) -> Iterator[Any]:
        yield from super().get_users(email)
        user_model = get_user_model()
        never_set = user_model._default_manager.filter(
            **{f"{user_model.get_email_field_name()}__iexact": email, "is_active": True}
        )
        for user in never_set:
            if not user.has_usable_password() and owner_permissions(user):
                yield user


class OwnerAuthenticationForm(AdminAuthenticationForm):
    """The admin's login form, which also lets in owners who are not staff."""

    def confirm_login_allowed(self, user: Any) -> None:
        if user.is_active and not user.is_staff and owner_permissions(user):
            return
        super().confirm_login_allowed(user)


def may_use_admin(user: AbstractBaseUser | AnonymousUser) -> bool:
    """Staff, and anyone who owns a tenant or a feature."""
    return user.is_active and (getattr(user, "is_staff", False) or bool(owner_permissions(user)))
