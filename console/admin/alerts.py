"""Admin for alert channels, rule overrides, alert history and deliveries. Owners see only
their tenants' rows (`console.scoping`); alerts and deliveries are read-only history."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html_join

from alerts.models import Alert, AlertRule, Channel, Delivery
from alerts.services import channel_enable, channel_test
from console.scoping import (
    OwnedTenantRequired,
    TenantScopedMixin,
    VisibleErrorsForm,
)

RelatedOnly = admin.RelatedOnlyFieldListFilter


class ChannelForm(VisibleErrorsForm):
    class Meta:
        model = Channel
        fields = "__all__"


@admin.register(Channel)
class ChannelAdmin(OwnedTenantRequired, admin.ModelAdmin):  # type: ignore[type-arg]
    form = ChannelForm
    list_display = ("name", "kind", "tenant", "feature", "enabled", "disabled_reason")
    list_filter = ("kind", "enabled", ("tenant", RelatedOnly))
    list_select_related = ("tenant", "feature__tenant")
    search_fields = ("name", "tenant__slug", "feature__slug")
    autocomplete_fields = ("tenant", "feature")
    readonly_fields = ("disabled_reason", "disabled_at", "created_at")
    fieldsets = (
        (None, {"fields": ("name", "tenant", "feature")}),
        ("Where to", {"fields": ("kind", "target", "secret")}),
        ("State", {"fields": ("enabled", "disabled_reason", "disabled_at", "created_at")}),
    )
    actions = ("send_test_alert", "enable")

    @admin.action(description="Send a test alert")
    def send_test_alert(self, request: HttpRequest, queryset: QuerySet[Channel]) -> None:
        for channel in queryset:
            delivery = channel_test(channel_id=channel.pk)
            if delivery.status == Delivery.Status.SENT:
                self.message_user(request, f"Test alert sent to {channel.name}.", messages.SUCCESS)
            else:
                text = f"Test alert to {channel.name} failed: {delivery.error}"
                self.message_user(request, text, messages.ERROR)

    @admin.action(description="Enable again")
    def enable(self, request: HttpRequest, queryset: QuerySet[Channel]) -> None:
        for channel in queryset:
            channel_enable(channel_id=channel.pk)
        self.message_user(request, f"{queryset.count()} channel(s) enabled.", messages.SUCCESS)


class AlertRuleForm(VisibleErrorsForm):
    class Meta:
        model = AlertRule
        fields = "__all__"


@admin.register(AlertRule)
class AlertRuleAdmin(OwnedTenantRequired, admin.ModelAdmin):  # type: ignore[type-arg]
    form = AlertRuleForm
    list_display = ("kind", "tenant", "feature", "enabled", "threshold", "window_minutes")
    list_filter = ("kind", "enabled", ("tenant", RelatedOnly))
    list_select_related = ("tenant", "feature__tenant")
    autocomplete_fields = ("tenant", "feature")


class ReadOnlyMixin:
    """History: written by the alerting itself, never edited by hand."""

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Alert)
class AlertAdmin(ReadOnlyMixin, TenantScopedMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("fired_at", "kind", "title", "tenant", "feature", "state", "deliveries")
    list_filter = ("state", "kind", ("tenant", RelatedOnly))
    list_select_related = ("tenant", "feature__tenant", "limit")
    date_hierarchy = "fired_at"
    exclude = ("details",)
    readonly_fields = ("title", "deliveries", "shown_details")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Alert]:
        queryset = super().get_queryset(request)
        return queryset.prefetch_related("fired_in__deliveries", "resolved_in__deliveries")

    @admin.display(description="what")
    def title(self, alert: Alert) -> str:
        return str(alert)

    @admin.display(description="details")
    def shown_details(self, alert: Alert) -> str:
        return format_html_join("", "<div>{}: {}</div>", sorted((alert.details or {}).items()))

    @admin.display(description="deliveries")
    def deliveries(self, alert: Alert) -> str:
        rows = [
            (f"{d.kind} {d.target}", d.status + (f" ({d.error[:80]})" if d.error else ""))
            for n in (alert.fired_in, alert.resolved_in)
            if n is not None
            for d in n.deliveries.all()
        ]
        return format_html_join("", "<div>{}: {}</div>", rows) or "-"


@admin.register(Delivery)
class DeliveryAdmin(ReadOnlyMixin, TenantScopedMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = (
        "created_at",
        "purpose",
        "kind",
        "target",
        "channel",
        "status",
        "attempts",
        "duration_ms",
        "error",
    )
    list_filter = ("status", "kind", "purpose", ("tenant", RelatedOnly))
    list_select_related = ("channel", "notification")
    date_hierarchy = "created_at"
