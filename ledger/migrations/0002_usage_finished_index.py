from django.db import migrations


class Migration(migrations.Migration):
    """Rollups bucket by creation time; an index on the finish time only slowed ingest."""

    dependencies = [("ledger", "0001_initial")]

    operations = [
        migrations.RemoveIndex(model_name="usageevent", name="ledger_usage_finished"),
    ]
