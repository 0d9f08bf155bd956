from __future__ import annotations

from django.urls import include, path

from bench.baseline import views
from config.urls import handler404, handler500

urlpatterns = [
    path("bench/bare", views.bare),
    path("bench/ratelimited", views.ratelimited),
    path("", include("config.urls")),
]

__all__ = ["handler404", "handler500", "urlpatterns"]
