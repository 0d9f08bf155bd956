from __future__ import annotations

from django.urls import path

from quotas.api import views

urlpatterns = [
    path("reservations", views.reservation_list, name="reservation-list"),
    path(
        "reservations/<str:reservation_id>",
        views.ReservationDetailView.as_view(),
        name="reservation-detail",
    ),
    path(
        "reservations/<str:reservation_id>/commit",
        views.reservation_commit,
        name="reservation-commit",
    ),
    path(
        "reservations/<str:reservation_id>/release",
        views.reservation_release,
        name="reservation-release",
    ),
    path(
        "reservations/<str:reservation_id>/extend",
        views.reservation_extend,
        name="reservation-extend",
    ),
    path("features/<str:slug>/usage", views.FeatureUsageView.as_view(), name="feature-usage"),
]
