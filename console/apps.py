"""The owner console: live state, usage charts, the dashboard and one-click actions, on top
of the Django admin (whose site this module replaces with `ConsoleAdminSite`)."""

from __future__ import annotations

from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps


class ConsoleConfig(AppConfig):
    name = "console"
    default = True


class ConsoleAdminConfig(admin_apps.AdminConfig):
    """`django.contrib.admin` with the console's site as `admin.site`."""

    default = False
    default_site = "console.site.ConsoleAdminSite"
