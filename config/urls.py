from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.urls import path
from django.views import defaults
from drf_spectacular.views import SpectacularAPIView

from console import urls as console_urls
from quotas.api import urls as api_urls
from quotas.api.docs import ApiDocsView
from quotas.api.errors import json_bad_request, json_not_found, json_server_error

urlpatterns = [
    *api_urls.urlpatterns,
    *console_urls.urlpatterns,
    path("admin/", admin.site.urls),
    path(
        "api/schema/",
        SpectacularAPIView.as_view(authentication_classes=[], permission_classes=[]),
        name="schema",
    ),
    path(
        "api/docs/",
        ApiDocsView.as_view(url_name="schema"),
        name="api-docs",
    ),
]


def handler400(request: HttpRequest, exception: Exception) -> HttpResponse:
    if request.path.startswith("/api/"):
        return json_bad_request(request, exception)
    return defaults.bad_request(request, exception)


def handler403(request: HttpRequest, exception: Exception) -> HttpResponse:
    if request.path.startswith("/api/"):
        return defaults.permission_denied(request, exception)
    return admin.site.permission_denied(request)  # type: ignore[attr-defined]


def handler404(request: HttpRequest, exception: Exception) -> HttpResponse:
    if request.path.startswith("/api/"):
        return json_not_found(request, exception)
    return defaults.page_not_found(request, exception)


def handler500(request: HttpRequest) -> HttpResponse:
    if request.path.startswith("/api/"):
        return json_server_error(request)
    return defaults.server_error(request)
