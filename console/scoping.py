"""Tenant isolation for the admin: one rule, applied to every way the admin reaches a row.

Superusers see everything. Every other user is scoped to what they own, whatever permissions
they hold: a tenant owner to the tenants listing them as owners, a feature owner to their
features (and those features' limits, keys and alerts). Django's permissions say *what kind* of
thing a user may touch (`console.access` derives them from ownership), this module says *which
rows*. A model the rules do not know is hidden from scoped users (fail closed), so a new model
cannot leak by being forgotten here.

The rule reaches changelists, change, delete and history pages (through `get_queryset` and the
history overrides), autocomplete (it asks the related admin's `get_queryset`), raw-id popups
(changelists), inlines, and the choices of every foreign key and many-to-many form field, so a
forged POST naming another tenant's id fails form validation instead of attaching to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from django import forms
from django.contrib.admin.utils import unquote
from django.contrib.auth import get_user_model
from django.core.exceptions import NON_FIELD_ERRORS, PermissionDenied, ValidationError
from django.db.models import Model, Q, QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import Http404, HttpRequest, HttpResponse
from simple_history.admin import SimpleHistoryAdmin

from alerts.models import Alert, AlertRule, Channel, Delivery, Notification
from providers.models import LanguageModel, Pool, Provider
from quotas.models import ApiKey, Limit
from tenants.models import Feature, Tenant

if TYPE_CHECKING:
    from django.contrib.admin.options import BaseModelAdmin
    from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
    from django.db.models.fields.related import ForeignKey, ManyToManyField

    User = AbstractBaseUser | AnonymousUser
    _AdminBase = BaseModelAdmin[Any]
else:
    _AdminBase = object

M = TypeVar("M", bound=Model)

# Shared infrastructure: every owner may see it (read-only, see `SharedConfigAdmin`).
SHARED_MODELS: frozenset[type[Model]] = frozenset({Provider, LanguageModel, Pool})


def is_scoped(user: User) -> bool:
    return not getattr(user, "is_superuser", False)


def owned_tenants(user: User) -> QuerySet[Tenant]:
    return Tenant.objects.filter(owners=user.pk)


def owned_features(user: User) -> QuerySet[Feature]:
    """The features `user` owns themselves (not through their tenant)."""
    return Feature.objects.filter(owner=user.pk)


@dataclass(frozen=True)
class Reach:
    """The ids of the tenants a user owns and of the features they own or own through a
    tenant; both None for a superuser (everything)."""

    tenant_ids: frozenset[int] | None
    feature_ids: frozenset[int] | None

    def covers(self, *, tenant_id: int | None, feature_id: int | None) -> bool:
        """Whether a row of this tenant and feature (a limit, usage) is the user's to act on."""
        if self.tenant_ids is None or self.feature_ids is None:
            return True
        return tenant_id in self.tenant_ids or feature_id in self.feature_ids


def reach(user: User) -> Reach:
    if not is_scoped(user):
        return Reach(None, None)
    tenants = owned_tenants(user)
    features = Feature.objects.filter(Q(tenant__in=tenants.values("pk")) | Q(owner=user.pk))
    return Reach(
        frozenset(tenants.values_list("pk", flat=True)),
        frozenset(features.values_list("pk", flat=True)),
    )


# Which rows of each model a scoped user may see. A tenant owner sees the rows of their tenants;
# a feature owner the rows of their own features: the feature, its limits, the API keys that
# may call only features they own, its alerts. Each rule is a Q over fields that the historical
# model keeps too (`id` is the tracked row's id there), so the same rules scope history. A row
# without a tenant (a pool's or a model's own capacity) belongs to no owner and is invisible
# to owners: it caps every tenant at once, so it is the platform's to set.
def _tenant_rule(user: User) -> Q:
    return Q(tenant__in=owned_tenants(user).values("pk"))


def _tenant_or_feature_rule(user: User) -> Q:
    return _tenant_rule(user) | Q(feature__in=owned_features(user).values("pk"))


def _feature_keys(user: User) -> QuerySet[ApiKey]:
    """Keys narrowed to features the user owns, and to no one else's."""
    foreign = ApiKey.objects.filter(features__in=Feature.objects.exclude(owner=user.pk))
    return ApiKey.objects.filter(features__owner=user.pk).exclude(pk__in=foreign.values("pk"))


RULES: dict[type[Model], Callable[[User], Q]] = {
    Tenant: lambda user: Q(id__in=owned_tenants(user).values("pk")),
    Feature: lambda user: _tenant_rule(user) | Q(id__in=owned_features(user).values("pk")),
    Limit: _tenant_or_feature_rule,
    ApiKey: lambda user: _tenant_rule(user) | Q(id__in=_feature_keys(user).values("pk")),
    Alert: _tenant_or_feature_rule,
    Notification: _tenant_or_feature_rule,
    Delivery: lambda user: (
        _tenant_rule(user) | Q(notification__feature__in=owned_features(user).values("pk"))
    ),
    Channel: _tenant_rule,
    AlertRule: _tenant_rule,
}


def _base_model(model: type[Model]) -> type[Model]:
    """The tracked model behind a simple_history historical model, or the model itself."""
    base: type[Model] = getattr(model, "instance_type", model)
    return base


def scope_queryset(user: User, queryset: QuerySet[M]) -> QuerySet[M]:
    """The rows of `queryset` (a model or its history) that `user` may see in the admin."""
    if not is_scoped(user):
        return queryset
    model = _base_model(queryset.model)
    if model in SHARED_MODELS:
        return queryset
    if model in RULES:
        return queryset.filter(RULES[model](user))
    if model is get_user_model():
        return queryset.filter(_tenant_people(user) | Q(pk=user.pk))
    return queryset.none()


def _tenant_people(user: User) -> Q:
    """The owners and feature owners of the user's tenants: whom an owner may name as an owner,
    without the admin listing every account on the platform."""
    tenants = owned_tenants(user).values("pk")
    tenant_owners = Tenant.owners.through.objects.filter(tenant__in=tenants).values("user_id")
    feature_owners = Feature.objects.filter(tenant__in=tenants).values("owner_id")
    return Q(pk__in=tenant_owners) | Q(pk__in=feature_owners)


def in_scope(user: User, obj: Model) -> bool:
    """Whether `user` may see `obj`: by the rule, for a stored row (or historical record); by
    the tenant and feature it names, for a row not stored (new, or deleted and seen through
    its history)."""
    if not is_scoped(user):
        return True
    model = _base_model(type(obj))
    if model in SHARED_MODELS:
        return True
    if model not in RULES:
        return False
    stored = type(obj)._default_manager.filter(pk=obj.pk) if obj.pk is not None else None
    if stored is not None and stored.exists():
        return stored.filter(RULES[model](user)).exists()
    tenant_id = obj.pk if model is Tenant else getattr(obj, "tenant_id", None)
    feature_id = obj.pk if model is Feature else getattr(obj, "feature_id", None)
    return tenant_id is not None and reach(user).covers(tenant_id=tenant_id, feature_id=feature_id)


def may_manage(user: User, obj: Model) -> bool:
    """Whether `user` may change how `obj` is configured, not only act on it (pause, boost,
    revoke): superusers and the owners of its tenant. A feature's owner acts on their feature
    but leaves its configuration (limits, owner, pools, keys' reach) to the tenant's owners."""
    if not is_scoped(user):
        return True
    tenant_id = obj.pk if isinstance(obj, Tenant) else getattr(obj, "tenant_id", None)
    return tenant_id is not None and owned_tenants(user).filter(pk=tenant_id).exists()


class TenantScopedMixin(_AdminBase):
    """Scopes a ModelAdmin or an inline: its rows, its permissions, its form field choices."""

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        return scope_queryset(request.user, super().get_queryset(request))

    def formfield_for_foreignkey(
        self, db_field: ForeignKey[Any, Any], request: HttpRequest, **kwargs: Any
    ) -> forms.ModelChoiceField | None:
        kwargs["queryset"] = self._scoped_choices(db_field, request, **kwargs)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def formfield_for_manytomany(
        self, db_field: ManyToManyField[Any, Any], request: HttpRequest, **kwargs: Any
    ) -> forms.ModelMultipleChoiceField | None:
        kwargs["queryset"] = self._scoped_choices(db_field, request, **kwargs)
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    def _scoped_choices(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> QuerySet[Any]:
        queryset = kwargs.get("queryset")
        if queryset is None:  # what Django would offer: the related admin's ordering, if any
            queryset = self.get_field_queryset(kwargs.get("using"), db_field, request)
        if queryset is None:
            queryset = db_field.remote_field.model._default_manager.all()
        return scope_queryset(request.user, queryset)

    # For a ModelAdmin `obj` is the row; for an inline it is the parent row. Either way a row
    # outside the user's tenants grants nothing, even when reached without `get_queryset`.
    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        allowed = super().has_view_permission(request, obj)
        return allowed and (obj is None or in_scope(request.user, obj))

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        allowed = super().has_change_permission(request, obj)
        return allowed and (obj is None or in_scope(request.user, obj))

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        allowed = super().has_delete_permission(request, obj)
        return allowed and (obj is None or in_scope(request.user, obj))


class OwnedTenantRequired(TenantScopedMixin):
    """A row without a tenant is the platform's (a limit without one binds every tenant on
    its pool or model): owners must name one of their tenants."""

    def formfield_for_foreignkey(
        self, db_field: ForeignKey[Any, Any], request: HttpRequest, **kwargs: Any
    ) -> forms.ModelChoiceField | None:
        field = super().formfield_for_foreignkey(db_field, request, **kwargs)
        if field is not None and db_field.name == "tenant" and is_scoped(request.user):
            field.required = True
        return field


class AuditedAdmin(TenantScopedMixin, SimpleHistoryAdmin):
    """A scoped admin whose history pages (who, when, what changed) are scoped too.

    simple_history falls back to the latest historical record when an object is not in
    `get_queryset`, and its version page looks records up without any queryset; both would show
    another tenant's rows, so both are narrowed here. Its version page also saves a POSTed
    revert after checking only *view* permission; a revert is a change, so it needs change.
    """

    def get_history_queryset(
        self, request: HttpRequest, history_manager: Any, pk_name: str, object_id: Any
    ) -> QuerySet[Any]:
        records = super().get_history_queryset(request, history_manager, pk_name, object_id)
        return scope_queryset(request.user, records)

    def history_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        self._refuse_out_of_scope(request, unquote(object_id))
        response: HttpResponse = super().history_view(request, object_id, extra_context)
        return response

    def history_form_view(
        self,
        request: HttpRequest,
        object_id: str,
        version_id: str,
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        self._refuse_out_of_scope(request, unquote(object_id))
        record = self._history_record(request, unquote(object_id), version_id)
        if request.method == "POST" and not self.has_change_permission(request, record.instance):
            raise PermissionDenied
        response: HttpResponse = super().history_form_view(
            request, object_id, version_id, extra_context
        )
        return response

    def _refuse_out_of_scope(self, request: HttpRequest, object_id: str) -> None:
        """404 when the object exists but outside the user's tenants; a deleted object's
        history stays reachable through its (scoped) historical records."""
        if self.get_object(request, object_id) is not None:
            return
        try:
            exists = self.model._default_manager.filter(pk=object_id).exists()
        except (ValueError, ValidationError):
            exists = False
        if exists:
            raise Http404

    def _history_record(self, request: HttpRequest, object_id: str, version_id: str) -> Any:
        manager = getattr(self.model._meta, "simple_history_manager_attribute", "history")
        records = scope_queryset(request.user, getattr(self.model, manager).all())
        try:
            return records.get(**{self.model._meta.pk.attname: object_id, "history_id": version_id})
        except (records.model.DoesNotExist, ValueError, ValidationError) as e:
            raise Http404 from e


class SharedReadOnlyMixin(_AdminBase):
    """Providers, models and pools are the platform's: owners may look, only superusers change
    anything, whatever permissions a group hands out."""

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return not is_scoped(request.user) and super().has_add_permission(request, *args)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return not is_scoped(request.user) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return not is_scoped(request.user) and super().has_delete_permission(request, obj)


class SharedConfigAdmin(SharedReadOnlyMixin, AuditedAdmin):
    """An audited admin of shared infrastructure."""


class OwnRowsInlineFormSet(BaseInlineFormSet):  # type: ignore[type-arg]
    """Refuses a row whose id is not one of the parent's (scoped) rows. Django accepts any id
    of the model there and then silently drops the row; an error says what happened."""

    def add_fields(self, form: forms.Form, index: int | None) -> None:
        super().add_fields(form, index)
        id_field = form.fields.get(self.model._meta.pk.name)
        if isinstance(id_field, forms.ModelChoiceField):
            id_field.queryset = self.get_queryset()


class VisibleErrorsForm(forms.ModelForm):  # type: ignore[type-arg]
    """Puts model errors about fields the form does not show (read-only for this user) at the
    top of the form, where Django would otherwise raise ValueError and answer with a 500."""

    def add_error(self, field: str | None, error: ValidationError | str | Any) -> None:
        if field is None and isinstance(error, ValidationError) and hasattr(error, "error_dict"):
            error = ValidationError(self._rekeyed(error.error_dict))
        elif field is not None and field not in self.fields:
            field, error = None, ValidationError(f"{field}: {error}")
        super().add_error(field, error)

    def _rekeyed(self, errors: dict[str, list[ValidationError]]) -> dict[str, list[Any]]:
        rekeyed: dict[str, list[Any]] = {}
        for name, messages in errors.items():
            if name == NON_FIELD_ERRORS or name in self.fields:
                rekeyed.setdefault(name, []).extend(messages)
            else:
                label = name.replace("_", " ")
                rekeyed.setdefault(NON_FIELD_ERRORS, []).extend(
                    f"{label}: {message}" for e in messages for message in e.messages
                )
        return rekeyed
