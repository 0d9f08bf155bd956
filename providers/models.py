from __future__ import annotations

from decimal import Decimal

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from simple_history.models import HistoricalRecords

from providers.backpressure import problems as backpressure_problems
from tenants.models import Priority

PRICE = {"max_digits": 12, "decimal_places": 6, "validators": [MinValueValidator(Decimal(0))]}


class Provider(models.Model):
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200, blank=True)
    history = HistoricalRecords()

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class LanguageModel(models.Model):
    """A model a provider serves, with its prices in USD per million tokens."""

    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="models")
    name = models.CharField(max_length=128)
    input_per_mtok = models.DecimalField("input $/Mtok", **PRICE)  # type: ignore[arg-type]
    cached_input_per_mtok = models.DecimalField(
        "cached input $/Mtok",
        null=True,
        blank=True,
        **PRICE,  # type: ignore[arg-type]
    )
    output_per_mtok = models.DecimalField("output $/Mtok", **PRICE)  # type: ignore[arg-type]
    context_window = models.PositiveIntegerField(null=True, blank=True)
    chars_per_token = models.DecimalField(
        max_digits=5,
        decimal_places=2,
        default=Decimal("4.00"),
        validators=[MinValueValidator(Decimal("0.5"))],
        help_text="Calibration of the offline token estimator for this model's tokenizer.",
    )
    history = HistoricalRecords()

    class Meta:
        ordering = ["provider__slug", "name"]
        verbose_name = "model"
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "name"], name="model_name_unique_in_provider"
            )
        ]

    def __str__(self) -> str:
        return f"{self.provider.slug}/{self.name}"


class Pool(models.Model):
    """One shared upstream capacity: a provider account, key or deployment."""

    class FailMode(models.TextChoices):
        CLOSED = "closed", "closed (refuse with 503 when the store is down)"
        OPEN = "open", "open (admit, marked degraded, when the store is down)"

    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200, blank=True)
    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="pools")
    served_models = models.ManyToManyField(
        LanguageModel, related_name="pools", blank=True, verbose_name="models"
    )
    fail_mode = models.CharField(max_length=8, choices=FailMode.choices, default=FailMode.CLOSED)
    protect = models.JSONField(
        default=dict,
        blank=True,
        help_text="Share of per-minute capacity kept for a class and those above it, "
        'e.g. {"interactive": 0.3}.',
    )
    position = models.PositiveIntegerField(
        default=0, help_text="Where several pools qualify, the lowest position is tried first."
    )
    line_minutes = models.DecimalField(
        max_digits=4,
        decimal_places=2,
        default=Decimal(1),
        validators=[MinValueValidator(Decimal(0)), MaxValueValidator(Decimal(5))],
        help_text="Callers that may wait (max_wait_ms) line up behind each per-minute limit "
        "for at most this many minutes of its capacity; 0 never schedules.",
    )
    backpressure = models.JSONField(
        default=dict,
        blank=True,
        help_text="Following the provider: adaptive (false), floor (0.25), decrease (0.7), "
        "cooldown_seconds (2), recovery_seconds (300); the breaker: breaker (true), "
        "breaker_window_seconds (30), breaker_min_calls (20), breaker_failure_ratio (0.5), "
        'breaker_open_seconds (30). E.g. {"adaptive": true}.',
    )
    history = HistoricalRecords(m2m_fields=[served_models])

    class Meta:
        ordering = ["position", "slug"]

    def __str__(self) -> str:
        return self.slug

    def clean(self) -> None:
        if not isinstance(self.protect, dict):
            raise ValidationError({"protect": "Give a mapping of priority class to a fraction."})
        for cls, share in self.protect.items():
            if cls not in Priority.values:
                raise ValidationError(
                    {"protect": f"'{cls}' is not a priority class ({', '.join(Priority.values)})."}
                )
            if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share < 1:
                raise ValidationError({"protect": f"The share for {cls} must be between 0 and 1."})
        if sum(self.protect.values()) >= 1:
            raise ValidationError({"protect": "Protected shares must add up to less than 1."})
        wrong = backpressure_problems(self.backpressure)
        if wrong:
            raise ValidationError({"backpressure": wrong})
