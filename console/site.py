"""The admin site: its index is the owner's dashboard."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.template.response import TemplateResponse

from console.panels import dashboard_context


class ConsoleAdminSite(admin.AdminSite):
    site_header = "LLM quota administration"
    site_title = "LLM quota admin"
    index_title = "Dashboard"
    index_template = "console/dashboard.html"

    def index(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> TemplateResponse:
        context = {**dashboard_context(request.user), **(extra_context or {})}
        return super().index(request, context)
