"""Admin for tenants and features. Isolation between tenants lives in `console.scoping`."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from console.admin.quotas import LimitInline
from console.admin_views import FeatureSwitchMixin, LivePanelMixin
from console.panels import feature_context, tenant_context
from console.scoping import AuditedAdmin, VisibleErrorsForm, is_scoped, may_manage
from tenants.models import Feature, Tenant

RelatedOnly = admin.RelatedOnlyFieldListFilter


OWNING_HELP = (
    " Naming someone is the one step that gives them access: they log in with their e-mail"
    ' address, and set a password with the login page\'s "Forgotten your login credentials?".'
)


class TenantForm(VisibleErrorsForm):
    class Meta:
        model = Tenant
        fields = "__all__"
        help_texts = {
            "owners": "They see and change this tenant, its features, limits, keys and channels,"
            " and receive its alerts." + OWNING_HELP
        }


@admin.register(Tenant)
class TenantAdmin(LivePanelMixin, AuditedAdmin):
    form = TenantForm
    list_display = ("slug", "name", "timezone", "status", "owner_list")
    list_filter = ("status",)
    search_fields = ("slug", "name")
    autocomplete_fields = ("owners",)

    def get_queryset(self, request: HttpRequest) -> Any:
        return super().get_queryset(request).prefetch_related("owners")

    def live_context(self, request: HttpRequest, obj: Tenant) -> dict[str, Any]:
        return tenant_context(obj, request.user)

    @admin.display(description="owners")
    def owner_list(self, tenant: Tenant) -> str:
        return ", ".join(user.get_username() for user in tenant.owners.all())

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        # Who owns a tenant decides who sees it, so only superusers grant it; the slug names
        # the tenant in config files and API clients.
        return ("slug", "owners") if is_scoped(request.user) else ()

    def has_add_permission(self, request: HttpRequest) -> bool:
        return not is_scoped(request.user) and super().has_add_permission(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return not is_scoped(request.user) and super().has_delete_permission(request, obj)


class FeatureForm(VisibleErrorsForm):
    class Meta:
        model = Feature
        fields = "__all__"
        help_texts = {
            "owner": "The one person accountable for this feature: receives its alerts, sees its"
            " live state, pauses it, boosts its limits and revokes its keys." + OWNING_HELP
        }


@admin.register(Feature)
class FeatureAdmin(FeatureSwitchMixin, LivePanelMixin, AuditedAdmin):
    form = FeatureForm
    list_display = ("__str__", "name", "owner", "priority", "status")
    list_filter = ("status", "priority", ("tenant", RelatedOnly), ("pools", RelatedOnly))
    list_select_related = ("tenant", "owner")
    search_fields = ("slug", "name", "tenant__slug", "owner__email")
    autocomplete_fields = ("tenant", "pools")
    inlines = (LimitInline,)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        if obj is not None and not may_manage(request.user, obj):
            # A feature's own owner acts on it (pauses it with the status); its place in the
            # tenant is for the tenant's owners to decide.
            return ("tenant", "slug", "owner", "priority", "pools")
        # Moving a feature would strand its limits and API keys in the old tenant.
        return ("tenant",) if obj is not None else ()

    def get_inlines(self, request: HttpRequest, obj: Any) -> Any:
        # A limit's checks look its feature up in the database, so limits come once it is saved.
        return self.inlines if obj is not None else ()

    def live_context(self, request: HttpRequest, obj: Feature) -> dict[str, Any]:
        return feature_context(obj, request.user)
