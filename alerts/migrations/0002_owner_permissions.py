"""Tenant owners manage their channels and rule overrides, and read their alert history."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.management import create_permissions
from django.db import migrations

GROUP_NAME = "Tenant owners"  # created by tenants 0002
ALL = ("view", "add", "change", "delete")
GRANTS: dict[str, tuple[str, ...]] = {
    "channel": ALL,
    "alertrule": ALL,
    "alert": ("view",),
    "notification": ("view",),
    "delivery": ("view",),
}


def grant(apps: Any, schema_editor: Any) -> None:
    # As in tenants 0002: on a fresh database permissions do not exist until post_migrate.
    app_config = apps.get_app_config("alerts")
    app_config.models_module = True
    create_permissions(app_config, apps=apps, verbosity=0)
    app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    group, _ = Group.objects.get_or_create(name=GROUP_NAME)
    for model, actions in GRANTS.items():
        for action in actions:
            group.permissions.add(
                Permission.objects.get(content_type__app_label="alerts", codename=f"{action}_{model}")
            )


def revoke(apps: Any, schema_editor: Any) -> None:
    Permission = apps.get_model("auth", "Permission")
    group = apps.get_model("auth", "Group").objects.filter(name=GROUP_NAME).first()
    if group is not None:
        group.permissions.remove(*Permission.objects.filter(content_type__app_label="alerts"))


class Migration(migrations.Migration):
    dependencies = [
        ("alerts", "0001_initial"),
        ("tenants", "0002_tenant_owner_group"),
    ]

    operations = [migrations.RunPython(grant, revoke)]
