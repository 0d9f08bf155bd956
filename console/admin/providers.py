"""Admin for providers, models and pools: shared by every tenant, changed by superusers only."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from console.admin_views import LivePanelMixin
from console.panels import pool_context
from console.scoping import (
    OwnRowsInlineFormSet,
    SharedConfigAdmin,
    SharedReadOnlyMixin,
    TenantScopedMixin,
    VisibleErrorsForm,
)
from console.templatetags.console_tags import amount
from providers.models import LanguageModel, Pool, Provider


class LanguageModelInline(SharedReadOnlyMixin, TenantScopedMixin, admin.TabularInline):  # type: ignore[type-arg]
    model = LanguageModel
    formset = OwnRowsInlineFormSet
    fields = ("name", "input_per_mtok", "cached_input_per_mtok", "output_per_mtok")
    extra = 0
    show_change_link = True


@admin.register(Provider)
class ProviderAdmin(SharedConfigAdmin):
    list_display = ("slug", "name")
    search_fields = ("slug", "name")
    inlines = (LanguageModelInline,)


@admin.register(LanguageModel)
class LanguageModelAdmin(SharedConfigAdmin):
    list_display = (
        "__str__",
        "input_price",
        "cached_input_price",
        "output_price",
        "context_window",
    )
    list_filter = ("provider",)
    list_select_related = ("provider",)
    search_fields = ("name", "provider__slug")
    autocomplete_fields = ("provider",)

    @admin.display(description="input $/Mtok", ordering="input_per_mtok")
    def input_price(self, model: LanguageModel) -> str:
        return amount(model.input_per_mtok, "usd")

    @admin.display(description="cached input $/Mtok", ordering="cached_input_per_mtok")
    def cached_input_price(self, model: LanguageModel) -> str:
        return amount(model.cached_input_per_mtok, "usd")

    @admin.display(description="output $/Mtok", ordering="output_per_mtok")
    def output_price(self, model: LanguageModel) -> str:
        return amount(model.output_per_mtok, "usd")


class PoolForm(VisibleErrorsForm):
    class Meta:
        model = Pool
        fields = "__all__"


@admin.register(Pool)
class PoolAdmin(LivePanelMixin, SharedConfigAdmin):
    form = PoolForm
    list_display = ("slug", "name", "provider", "fail_mode", "position", "model_list")
    list_filter = ("provider", "fail_mode")
    list_select_related = ("provider",)
    search_fields = ("slug", "name", "provider__slug")
    autocomplete_fields = ("provider", "served_models")

    def get_queryset(self, request: HttpRequest) -> Any:
        return super().get_queryset(request).prefetch_related("served_models")

    def live_context(self, request: HttpRequest, obj: Pool) -> dict[str, Any]:
        return pool_context(obj, request.user)

    @admin.display(description="models")
    def model_list(self, pool: Pool) -> str:
        return ", ".join(model.name for model in pool.served_models.all())
