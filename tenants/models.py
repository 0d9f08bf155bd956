from __future__ import annotations

import zoneinfo

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import validate_slug
from django.db import models
from simple_history.models import HistoricalRecords


def validate_timezone(value: str) -> None:
    if value not in zoneinfo.available_timezones():
        raise ValidationError(f"'{value}' is not an IANA time zone (for example Europe/Berlin).")


class Priority(models.TextChoices):
    """Ordered from most to least important; see `rank`."""

    INTERACTIVE = "interactive"
    STANDARD = "standard"
    BATCH = "batch"
    BACKGROUND = "background"

    @classmethod
    def rank(cls, value: str) -> int:
        """0 is the most important class."""
        return list(cls.values).index(value)


class Tenant(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active"
        SUSPENDED = "suspended"

    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200, blank=True)
    timezone = models.CharField(max_length=64, default="UTC", validators=[validate_timezone])
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    owners = models.ManyToManyField(
        settings.AUTH_USER_MODEL,
        blank=True,
        related_name="owned_tenants",
        help_text="Staff users who see and edit this tenant in the admin and receive its alerts.",
    )
    history = HistoricalRecords(m2m_fields=[owners])

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class Feature(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active"
        PAUSED = "paused"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="features")
    slug = models.CharField(max_length=64, validators=[validate_slug])
    name = models.CharField(max_length=200, blank=True)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        related_name="owned_features",
        help_text="The one person accountable for this feature; receives its alerts.",
    )
    priority = models.CharField(max_length=16, choices=Priority.choices, default=Priority.STANDARD)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    pools = models.ManyToManyField(
        "providers.Pool",
        blank=True,
        related_name="features",
        help_text="Pools this feature may use; none means every pool that serves the model.",
    )
    history = HistoricalRecords(m2m_fields=[pools])

    class Meta:
        ordering = ["tenant__slug", "slug"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "slug"], name="feature_slug_unique_in_tenant")
        ]

    def __str__(self) -> str:
        return f"{self.tenant.slug}/{self.slug}"

    def clean(self) -> None:
        if self.owner_id is not None and not self.owner.email:
            raise ValidationError({"owner": "The owner needs an e-mail address to receive alerts."})
