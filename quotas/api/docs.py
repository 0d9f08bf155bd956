"""The API's documentation page: Redoc, from drf-spectacular-sidecar's static files."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from drf_spectacular.views import SpectacularRedocView
from rest_framework.request import Request
from rest_framework.response import Response

# Everything from this site. Redoc styles itself inline and searches in a blob: worker; its
# sidebar's "API docs by Redocly" logo would come from Redocly's CDN, and is refused here
# (Redoc then shows the link without it).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "worker-src 'self' blob:; font-src 'self' data:"
)


class ApiDocsView(SpectacularRedocView):
    template_name = "quotas/api_docs.html"
    authentication_classes = []
    permission_classes = []

    @extend_schema(exclude=True)  # a page about the API, not a route of it
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        response = super().get(request, *args, **kwargs)
        response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return response
