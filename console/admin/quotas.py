"""Admin for limits and API keys. Isolation between tenants lives in `console.scoping`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from weakref import WeakKeyDictionary

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse

from console.admin_views import ApiKeyRevokeMixin, LimitBoostMixin
from console.fields import PercentListField, PlainDecimalField, plain_number
from console.scoping import (
    AuditedAdmin,
    OwnedTenantRequired,
    OwnRowsInlineFormSet,
    TenantScopedMixin,
    VisibleErrorsForm,
    is_scoped,
    may_manage,
)
from quotas.keys import api_key_create, api_key_revoke
from quotas.models import ApiKey, Limit
from quotas.validation import limit_describe

RelatedOnly = admin.RelatedOnlyFieldListFilter


class LimitForm(VisibleErrorsForm):
    """Validation is `Limit.clean` (through ModelForm), the same rules `quota apply` uses."""

    class Meta:
        model = Limit
        fields = "__all__"
        field_classes = {"amount": PlainDecimalField, "guaranteed": PlainDecimalField}

    class Media:
        js = ("console/limit-form.js",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Replaced here, not declared: a declared field stays on the form when the admin
        # shows it read-only, and would save the empty value it did not receive.
        if "alert_at" in self.fields:
            self.fields["alert_at"] = PercentListField(
                label="Alert at (%)",
                required=False,
                help_text="Percentages of the amount at which the owners are alerted, e.g. "
                "50, 80, 100; empty for none. Budgets (hour, day, month) only.",
            )


# Read-only, a field is shown through one of these (the admin would print the stored
# `20000.000000` and `[0.5, 0.8]`).
SHOWN = {"amount": "amount_shown", "guaranteed": "guaranteed_shown", "alert_at": "alert_at_shown"}


def shown(fields: Sequence[Any], readonly: Sequence[str]) -> tuple[Any, ...]:
    return tuple(SHOWN[f] if f in SHOWN and f in readonly else f for f in fields)


def nothing_to_save(request: HttpRequest, obj: Any) -> dict[str, bool]:
    """A feature's owner sees a limit or a key read-only (they boost or revoke it with the
    buttons above): no save buttons that would save nothing."""
    if may_manage(request.user, obj):
        return {}
    return {"show_save": False, "show_save_and_continue": False, "show_save_and_add_another": False}


class LimitWordsMixin:
    @admin.display(description="limit")
    def in_words(self, limit: Limit) -> str:
        return limit_describe(limit) if limit.pk else "-"

    @admin.display(description="amount")
    def amount_shown(self, limit: Limit) -> str:
        return plain_number(limit.amount) or "-"

    @admin.display(description="guaranteed")
    def guaranteed_shown(self, limit: Limit) -> str:
        return plain_number(limit.guaranteed) or "-"

    @admin.display(description="alert at")
    def alert_at_shown(self, limit: Limit) -> str:
        if limit.window not in ("hour", "day", "month"):
            return "-"
        return ", ".join(f"{plain_number(v * 100)}%" for v in limit.alert_at or []) or "none"


LIMIT_FIELDS: tuple[str, ...] = (
    "pool",
    "model",
    "metric",
    "window",
    "amount",
    "guaranteed",
    "enforcement",
    "alert_at",
)


def limit_readonly_fields(request: HttpRequest, owner: Any = None) -> tuple[str, ...]:
    """`owner` is the row whose tenant decides (the limit, or the feature of an inline)."""
    if owner is not None and not may_manage(request.user, owner):
        # A feature's own owner boosts its limits; setting them is the tenant owners' call.
        return ("in_words", *LIMIT_FIELDS)
    # A guaranteed share is carved out of a pool every tenant shares: allocating it is the
    # platform's decision, and an owner claiming it all would starve other tenants' guarantees.
    return ("in_words", "guaranteed") if is_scoped(request.user) else ("in_words",)


class LimitInline(LimitWordsMixin, TenantScopedMixin, admin.TabularInline):  # type: ignore[type-arg]
    """The limits of one feature, on the feature's page; their tenant is the feature's."""

    model = Limit
    form = LimitForm
    formset = OwnRowsInlineFormSet
    fk_name = "feature"
    # Each row's title already says the limit in words (`__str__`), so no column repeats it.
    fields = (
        "pool",
        "model",
        "metric",
        "window",
        "amount",
        "guaranteed",
        "enforcement",
        "alert_at",
    )
    autocomplete_fields = ("pool", "model")
    extra = 0
    show_change_link = True

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        return tuple(SHOWN.get(f, f) for f in limit_readonly_fields(request, obj))

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return shown(self.fields, limit_readonly_fields(request, obj))

    def get_queryset(self, request: HttpRequest) -> QuerySet[Limit]:
        return super().get_queryset(request).select_related("tenant", "feature", "pool", "model")


@admin.register(Limit)
class LimitAdmin(LimitBoostMixin, LimitWordsMixin, OwnedTenantRequired, AuditedAdmin):
    form = LimitForm
    list_display = ("in_words", "tenant", "feature", "pool", "model", "metric", "window")
    list_filter = (
        "metric",
        "window",
        "enforcement",
        ("tenant", RelatedOnly),
        ("pool", RelatedOnly),
    )
    list_select_related = ("tenant", "feature", "pool", "model")
    search_fields = ("tenant__slug", "feature__slug", "pool__slug", "model__name")
    autocomplete_fields = ("tenant", "feature", "pool", "model")
    fieldsets = (
        (
            "Scope",
            {
                "fields": ("in_words", "tenant", "feature", "pool", "model"),
                "description": "Which calls the limit counts: any combination of tenant, "
                "feature, pool and model.",
            },
        ),
        ("Rule", {"fields": ("metric", "window", "amount", "guaranteed", "enforcement", "burst")}),
        (
            "Boost",
            {
                "fields": ("boost_amount", "boost_until"),
                "description": "A higher cap for a while, set with the Boost button above.",
            },
        ),
        ("Alerts", {"fields": ("alert_at",)}),
    )

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        # A boost is set on its own page, whose rules (above the amount, ends within a
        # month) and audit words the form would skip.
        return tuple(SHOWN.get(f, f) for f in self._readonly(request, obj))

    def _readonly(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        readonly = limit_readonly_fields(request, obj)
        if obj is not None and not may_manage(request.user, obj):
            readonly = (*readonly, "tenant", "feature")
        return (*readonly, "boost_amount", "boost_until")

    def console_context(self, request: HttpRequest, obj: Any) -> dict[str, Any]:
        return {**super().console_context(request, obj), **nothing_to_save(request, obj)}

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        readonly = self._readonly(request, obj)
        return [
            (name, {**options, "fields": shown(list(options["fields"]), readonly)})
            for name, options in super().get_fieldsets(request, obj)
        ]


class ApiKeyForm(VisibleErrorsForm):
    class Meta:
        model = ApiKey
        fields = ("tenant", "name", "features")

    def clean(self) -> dict[str, Any]:
        cleaned: dict[str, Any] = super().clean() or {}
        tenant = cleaned.get("tenant") or (self.instance.tenant if self.instance.pk else None)
        strangers = [
            f.slug for f in cleaned.get("features", ()) if tenant and f.tenant_id != tenant.pk
        ]
        if strangers:
            self.add_error("features", f"Not features of tenant '{tenant}': {', '.join(strangers)}")
        return cleaned


# The secret travels from `save_form` to `response_add` within one request and is dropped
# with it; it never reaches the session, a message cookie or the database.
_issued_secrets: WeakKeyDictionary[HttpRequest, str] = WeakKeyDictionary()


@admin.register(ApiKey)
class ApiKeyAdmin(ApiKeyRevokeMixin, AuditedAdmin):
    form = ApiKeyForm
    list_display = (
        "__str__",
        "tenant",
        "prefix",
        "narrowed_to",
        "created_at",
        "last_used_at",
        "revoked_at",
    )
    list_filter = (("tenant", RelatedOnly), ("revoked_at", admin.EmptyFieldListFilter))
    list_select_related = ("tenant",)
    search_fields = ("name", "prefix", "tenant__slug")
    autocomplete_fields = ("tenant", "features")
    actions = ("revoke",)

    def get_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        if obj is None:
            return ("tenant", "name", "features")
        return ("tenant", "name", "features", "prefix", "created_at", "last_used_at", "revoked_at")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        if obj is None:
            return ()
        # A key stays with the tenant it was issued for; revoking is the "revoke" action. A
        # feature's owner revokes the keys of their features; what a key may call is for the
        # tenant's owners to decide.
        fixed = ("tenant", "prefix", "created_at", "last_used_at", "revoked_at")
        return fixed if may_manage(request.user, obj) else ("name", "features", *fixed)

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiKey]:
        return super().get_queryset(request).prefetch_related("features")

    def console_context(self, request: HttpRequest, obj: Any) -> dict[str, Any]:
        return {**super().console_context(request, obj), **nothing_to_save(request, obj)}

    @admin.display(description="narrowed to")
    def narrowed_to(self, api_key: ApiKey) -> str:
        return ", ".join(f.slug for f in api_key.features.all()) or "every feature"

    def save_form(self, request: HttpRequest, form: Any, change: bool) -> Any:
        if change:
            return super().save_form(request, form, change)
        issued = api_key_create(
            tenant=form.cleaned_data["tenant"],
            features=form.cleaned_data["features"],
            name=form.cleaned_data["name"],
        )
        _issued_secrets[request] = issued.secret
        return issued.api_key

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:  # a new key was saved, with its features, by `api_key_create`
            super().save_model(request, obj, form, change)

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        if change:
            super().save_related(request, form, formsets, change)

    def response_add(
        self, request: HttpRequest, obj: ApiKey, post_url_continue: str | None = None
    ) -> HttpResponse:
        secret = _issued_secrets.pop(request, None)
        if secret is None:
            return super().response_add(request, obj, post_url_continue)
        context = {
            **self.admin_site.each_context(request),
            "title": f"API key {obj}: copy it now",
            "opts": self.opts,
            "api_key": obj,
            "secret": secret,
            "change_url": reverse("admin:quotas_apikey_change", args=[obj.pk]),
        }
        return TemplateResponse(request, "admin/quotas/apikey/secret_once.html", context)

    @admin.action(description="Revoke the selected API keys", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> HttpResponse | None:
        asked = self.confirm_selected(
            request,
            queryset.filter(revoked_at=None),
            action="revoke",
            consequence="Every request made with these keys is refused from the next one on; "
            "a revoked key cannot be restored:",
            label="Yes, revoke them",
        )
        if asked is not None:
            return asked
        keys = list(queryset.filter(revoked_at=None))
        for api_key in keys:
            self.give_reason(api_key, "Revoked the key.")
            api_key_revoke(api_key=api_key)
            self.log_change(request, api_key, "Revoked the key.")
        self.message_user(request, f"Revoked {len(keys)} API key(s).", messages.SUCCESS)
        return None
