from django.db import migrations


def at_least_one(apps, schema_editor):
    """A configured install whose configuration predates the version row, and never changed
    since, still has version 0, which the engine reads as "never configured": a store that
    lost its data would go on deciding from counters at zero. Any limit makes it 1."""
    if not apps.get_model("quotas", "Limit").objects.exists():
        return
    ConfigVersion = apps.get_model("quotas", "ConfigVersion")
    row, _ = ConfigVersion.objects.get_or_create(pk=1)
    if row.number < 1:
        ConfigVersion.objects.filter(pk=1).update(number=1)


class Migration(migrations.Migration):

    dependencies = [
        ('quotas', '0005_limit_identity'),
    ]

    operations = [
        migrations.RunPython(at_least_one, migrations.RunPython.noop),
    ]
