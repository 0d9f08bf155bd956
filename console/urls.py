"""The console's pages outside the admin's own URLs: Django's password reset views, in the
admin's look, so that an owner without a password (made from the config file, or named in the
admin) sets one by e-mail. The login page links here by the URL name `admin_password_reset`."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path

from console.access import OwnerPasswordResetForm

_look = {"site_header": admin.site.site_header, "site_title": admin.site.site_title}

urlpatterns = [
    path(
        "admin/password_reset/",
        auth_views.PasswordResetView.as_view(
            form_class=OwnerPasswordResetForm,
            extra_context=_look,
            subject_template_name="console/password_reset_subject.txt",
            email_template_name="console/password_reset_email.txt",
        ),
        name="admin_password_reset",
    ),
    path(
        "admin/password_reset/done/",
        auth_views.PasswordResetDoneView.as_view(extra_context=_look),
        name="password_reset_done",
    ),
    path(
        "admin/reset/<uidb64>/<token>/",
        auth_views.PasswordResetConfirmView.as_view(extra_context=_look),
        name="password_reset_confirm",
    ),
    path(
        "admin/reset/done/",
        auth_views.PasswordResetCompleteView.as_view(extra_context=_look),
        name="password_reset_complete",
    ),
]
