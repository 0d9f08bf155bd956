"""The reservation API's routes, with their /api/v1/ prefix written out: the root URLconf
lists them first, directly rather than through `include()`, since every level of includes
costs each call another resolver match (the API answers thousands of calls a second)."""

from __future__ import annotations

from django.urls import path

from quotas.api import views
from quotas.api.middleware import API_PREFIX

PREFIX = API_PREFIX.removeprefix("/")

urlpatterns = [
    path(PREFIX + "reservations", views.ReservationListView.as_view(), name="reservation-list"),
    path(
        PREFIX + "reservations/<str:reservation_id>",
        views.ReservationDetailView.as_view(),
        name="reservation-detail",
    ),
    path(
        PREFIX + "reservations/<str:reservation_id>/commit",
        views.ReservationCommitView.as_view(),
        name="reservation-commit",
    ),
    path(
        PREFIX + "reservations/<str:reservation_id>/release",
        views.ReservationReleaseView.as_view(),
        name="reservation-release",
    ),
    path(
        PREFIX + "reservations/<str:reservation_id>/extend",
        views.ReservationExtendView.as_view(),
        name="reservation-extend",
    ),
    path(
        PREFIX + "features/<str:slug>/usage",
        views.FeatureUsageView.as_view(),
        name="feature-usage",
    ),
]
