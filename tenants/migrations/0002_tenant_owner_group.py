"""The "Tenant owners" group: the model permissions an owner needs to use the admin.

Permissions say what kind of row an owner may touch; which rows (only their tenants') is
decided by the admin (console.scoping), whatever permissions a user holds.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.management import create_permissions
from django.db import migrations

GROUP_NAME = "Tenant owners"

ALL = ("view", "add", "change", "delete")
# (app label, model name): actions. Historical models are readable so that history pages
# work when SIMPLE_HISTORY_ENFORCE_HISTORY_MODEL_PERMISSIONS is turned on.
GRANTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("tenants", "tenant"): ("view", "change"),
    ("tenants", "feature"): ALL,
    ("quotas", "limit"): ALL,
    ("quotas", "apikey"): ALL,
    ("providers", "provider"): ("view",),
    ("providers", "languagemodel"): ("view",),
    ("providers", "pool"): ("view",),
    ("tenants", "historicaltenant"): ("view",),
    ("tenants", "historicalfeature"): ("view",),
    ("quotas", "historicallimit"): ("view",),
    ("quotas", "historicalapikey"): ("view",),
    ("providers", "historicalprovider"): ("view",),
    ("providers", "historicallanguagemodel"): ("view",),
    ("providers", "historicalpool"): ("view",),
}


def create_group(apps: Any, schema_editor: Any) -> None:
    # Permissions are normally created after all migrations ran (post_migrate); on a fresh
    # database they do not exist yet, so create them now from the migration state.
    for label in ("tenants", "providers", "quotas"):
        app_config = apps.get_app_config(label)
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None

    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    group, _ = Group.objects.get_or_create(name=GROUP_NAME)
    for (app_label, model), actions in GRANTS.items():
        for action in actions:
            group.permissions.add(
                Permission.objects.get(
                    content_type__app_label=app_label, codename=f"{action}_{model}"
                )
            )


def delete_group(apps: Any, schema_editor: Any) -> None:
    apps.get_model("auth", "Group").objects.filter(name=GROUP_NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("tenants", "0001_initial"),
        ("providers", "0001_initial"),
        ("quotas", "0001_initial"),
    ]

    operations = [migrations.RunPython(create_group, delete_group)]
