"""The admin site: its index is the owner's dashboard; owners get in by owning something."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from console.access import OwnerAuthenticationForm, may_use_admin
from console.panels import dashboard_context


class ConsoleAdminSite(admin.AdminSite):
    site_header = "LLM quota administration"
    site_title = "LLM quota admin"
    index_title = "Dashboard"
    index_template = "console/dashboard.html"
    site_url = None  # the product has no public site: no "View site" link
    login_form = OwnerAuthenticationForm

    def has_permission(self, request: HttpRequest) -> bool:
        return may_use_admin(request.user)

    def index(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> TemplateResponse:
        context = {**dashboard_context(request.user), **(extra_context or {})}
        return super().index(request, context)

    def permission_denied(self, request: HttpRequest) -> HttpResponse:
        """The page a user gets instead of a bare 403: what they may not see, and where to go
        (the dashboard, or the login page for someone the admin does not let in)."""
        context = {
            **self.each_context(request),
            "title": "Not yours to see",
            "may_use_admin": may_use_admin(request.user),
        }
        response = TemplateResponse(request, "console/403.html", context, status=403)
        return response.render()
