"""The ledger in the admin: read-only, for superusers (it spans every tenant; owners see their
usage through the rollups on their own pages). The drift report lives on the usage list."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.contrib import admin, messages
from django.db.models import Model
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html

from console.templatetags.console_tags import amount
from ledger.models import DeadLetter, ProviderUsage, Refusal, UsageEvent, UsageRollup
from ledger.reconcile import budgets_reconcile
from ledger.selectors import provider_drift
from quotas.models import Limit
from quotas.plan import NANO
from quotas.validation import limit_describe


class LedgerAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Rows are written by the ingest only; nobody edits the record. Money is shown in
    dollars, not the ledger's nano-dollars."""

    @admin.display(description="cost", ordering="cost_nusd")
    def cost(self, row: Any) -> str:
        return "-" if row.cost_nusd is None else amount(Decimal(row.cost_nusd) / NANO, "usd")

    def has_module_permission(self, request: HttpRequest) -> bool:
        return bool(getattr(request.user, "is_superuser", False))

    def has_view_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return bool(getattr(request.user, "is_superuser", False))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False


@admin.register(UsageEvent)
class UsageEventAdmin(LedgerAdmin):
    list_display = ("rid", "state", "tenant", "feature", "pool", "model", "input_tokens",
                    "output_tokens", "cost", "finish_reason", "created_at")  # fmt: skip
    list_filter = ("state", "tenant", "pool", "model", "finish_reason", "degraded")
    search_fields = ("rid", "feature")
    change_list_template = "admin/ledger/usageevent/change_list.html"

    def get_urls(self) -> list[URLPattern]:
        drift = path("drift/", self.admin_site.admin_view(self.drift_view), name="ledger_drift")
        return [drift, *super().get_urls()]

    def drift_view(self, request: HttpRequest) -> HttpResponse:
        if not getattr(request.user, "is_superuser", False):
            return HttpResponse(status=403)
        if request.method == "POST":
            report = budgets_reconcile(repair=True)
            messages.success(request, f"{report.repaired} budget counters repaired.")
            return HttpResponseRedirect(reverse("admin:ledger_drift"))
        pools = ProviderUsage.objects.values_list("pool", flat=True).distinct()
        context: dict[str, Any] = {
            **self.admin_site.each_context(request),
            "title": "Drift: Redis budgets and provider usage against the ledger",
            "report": budgets_reconcile(),
            "provider_alerts": [d for pool in pools for d in provider_drift(pool=pool) if d.alert],
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/ledger/drift.html", context)


@admin.register(Refusal)
class RefusalAdmin(LedgerAdmin):
    list_display = ("at", "reason", "limit_named", "tenant", "feature", "model", "rid")
    list_filter = ("reason", "tenant")

    @admin.display(description="refused at", ordering="at_ms")
    def at(self, refusal: Refusal) -> datetime:
        return datetime.fromtimestamp(refusal.at_ms / 1000, tz=UTC)

    @admin.display(description="limit")
    def limit_named(self, refusal: Refusal) -> str:
        if refusal.limit_id is None:
            return "-"
        limit = Limit.objects.select_related("tenant", "feature", "pool", "model").filter(
            pk=refusal.limit_id
        )
        return next(
            (limit_describe(found) for found in limit), f"limit {refusal.limit_id} (deleted)"
        )


@admin.register(UsageRollup)
class UsageRollupAdmin(LedgerAdmin):
    list_display = ("grain", "start", "tenant", "feature", "pool", "model", "requests",
                    "output_tokens", "cost", "refused_rate_limited",
                    "refused_budget_exhausted", "truncated", "upstream_429", "expired")  # fmt: skip
    list_filter = ("grain", "tenant", "pool")
    date_hierarchy = "start"


@admin.register(ProviderUsage)
class ProviderUsageAdmin(LedgerAdmin):
    list_display = ("pool", "day", "model", "requests", "input_tokens", "output_tokens",
                    "cost", "source", "imported_at")  # fmt: skip
    list_filter = ("pool", "source")


@admin.register(DeadLetter)
class DeadLetterAdmin(LedgerAdmin):
    """Stream entries the ingest could not store: each with the database's error and the
    fields as received, to fix at their source and replay if they matter."""

    list_display = ("entry_id", "parked_at", "event_type", "tenant", "rid", "error")
    list_filter = ("event_type", "tenant")
    search_fields = ("entry_id", "rid", "error")
    fields = ("entry_id", "parked_at", "event_type", "tenant", "rid", "error", "raw_fields")
    readonly_fields = fields

    @admin.display(description="fields as received")
    def raw_fields(self, obj: DeadLetter) -> str:
        # escaped JSON (NUL and undecodable bytes stay visible as \u escapes)
        pretty = json.dumps(json.loads(obj.fields), indent=2, sort_keys=True, ensure_ascii=True)
        return format_html("<pre>{}</pre>", pretty)
