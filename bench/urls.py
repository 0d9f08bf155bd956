from __future__ import annotations

from django.urls import include, path

from bench.baseline import views

urlpatterns = [
    path("bench/bare", views.bare),
    path("bench/ratelimited", views.ratelimited),
    path("", include("config.urls")),
]
