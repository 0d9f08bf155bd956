from __future__ import annotations

from django.urls import path

from quotas.api import views

urlpatterns = [
    path("reservations", views.ReservationListView.as_view(), name="reservation-list"),
    path(
        "reservations/<str:reservation_id>",
        views.ReservationDetailView.as_view(),
        name="reservation-detail",
    ),
    path(
        "reservations/<str:reservation_id>/commit",
        views.ReservationCommitView.as_view(),
        name="reservation-commit",
    ),
    path(
        "reservations/<str:reservation_id>/release",
        views.ReservationReleaseView.as_view(),
        name="reservation-release",
    ),
    path(
        "reservations/<str:reservation_id>/extend",
        views.ReservationExtendView.as_view(),
        name="reservation-extend",
    ),
    path("features/<str:slug>/usage", views.FeatureUsageView.as_view(), name="feature-usage"),
]
