from __future__ import annotations

from django.urls import path

from bench.baseline import views
from config import urls
from config.urls import handler400, handler404, handler500

# The product's routes as deployed (config.urls), after the two baselines, in one list: an
# include() would put every product route one resolver level deeper than in production.
urlpatterns = [
    path("bench/bare", views.bare),
    path("bench/ratelimited", views.ratelimited),
    *urls.urlpatterns,
]

__all__ = ["handler400", "handler404", "handler500", "urlpatterns"]
