from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db import IntegrityError, models, transaction
from django.db.models import Value
from django.db.models.functions import Coalesce
from simple_history.models import HistoricalRecords

from providers.models import LanguageModel, Pool
from quotas.validation import limit_describe, limit_validate
from tenants.models import Feature, Tenant


class Metric(models.TextChoices):
    REQUESTS = "requests"
    TOKENS = "tokens"
    INPUT_TOKENS = "input_tokens", "input tokens"
    OUTPUT_TOKENS = "output_tokens", "output tokens"
    COST_USD = "cost_usd", "USD"
    CONCURRENT = "concurrent", "concurrent requests"


class Window(models.TextChoices):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    MONTH = "month"


# A limit's identity: its scope (a missing part counts as none), metric and window. `clean()`
# checks it first with words that name the limit; this catches two saves racing past that.
LIMIT_IDENTITY = models.UniqueConstraint(
    Coalesce("tenant", Value(0)),
    Coalesce("feature", Value(0)),
    Coalesce("pool", Value(0)),
    Coalesce("model", Value(0)),
    "metric",
    "window",
    name="limit_identity",
    violation_error_message="This scope already has a limit of this metric and window.",
)


class Enforcement(models.TextChoices):
    HARD = "hard", "hard (refuse)"
    SOFT = "soft", "soft (admit and alert)"
    SHADOW = "shadow", "shadow (admit and record)"


DEFAULT_ALERT_AT = [0.5, 0.8, 1.0]


def default_alert_at() -> list[float]:
    return list(DEFAULT_ALERT_AT)


def boost_active(boost_amount: Decimal | None, boost_until: datetime | None, now: datetime) -> bool:
    return boost_amount is not None and boost_until is not None and now < boost_until


def amount_at(
    amount: Decimal | None,
    boost_amount: Decimal | None,
    boost_until: datetime | None,
    now: datetime,
) -> Decimal | None:
    """`Limit.amount_at` from the limit's fields."""
    if boost_amount is None or amount is None or not boost_active(boost_amount, boost_until, now):
        return amount
    return max(amount, boost_amount)


class Limit(models.Model):
    """One rule: a scope, a metric, a window, an amount and an enforcement.

    The rules a limit must satisfy live in `quotas.validation` and run from `clean()`, so
    the admin, `quota apply` and the services all refuse the same things with the same words.
    """

    tenant = models.ForeignKey(
        Tenant, null=True, blank=True, on_delete=models.CASCADE, related_name="limits"
    )
    feature = models.ForeignKey(
        Feature, null=True, blank=True, on_delete=models.CASCADE, related_name="limits"
    )
    pool = models.ForeignKey(
        Pool, null=True, blank=True, on_delete=models.CASCADE, related_name="limits"
    )
    model = models.ForeignKey(
        LanguageModel, null=True, blank=True, on_delete=models.CASCADE, related_name="limits"
    )
    metric = models.CharField(max_length=16, choices=Metric.choices)
    window = models.CharField(
        max_length=8,
        choices=Window.choices,
        blank=True,
        help_text="minute: a continuously refilling token bucket; hour, day, month: a calendar "
        "budget in the tenant's time zone. Concurrency limits take no window.",
    )
    amount = models.DecimalField(
        max_digits=20,
        decimal_places=6,
        null=True,
        blank=True,
        help_text="The cap. For a feature on a pool it is the feature's ceiling.",
    )
    guaranteed = models.DecimalField(
        max_digits=20,
        decimal_places=6,
        null=True,
        blank=True,
        help_text="For a feature on a pool: the share of the pool no other feature can take.",
    )
    enforcement = models.CharField(
        max_length=8, choices=Enforcement.choices, default=Enforcement.HARD
    )
    burst = models.DecimalField(
        max_digits=20,
        decimal_places=6,
        null=True,
        blank=True,
        help_text="Per-minute limits: the bucket's depth, the most admitted at once (empty: the "
        "whole amount). The bucket refills at amount per minute; starting full, it admits up "
        "to burst + amount in its first minute (twice the amount without a burst).",
    )
    boost_amount = models.DecimalField(
        "boosted amount",
        max_digits=20,
        decimal_places=6,
        null=True,
        blank=True,
        help_text="A temporary cap, above the amount, in force until the boost ends.",
    )
    boost_until = models.DateTimeField(
        "boost ends",
        null=True,
        blank=True,
        help_text="When the boosted amount stops applying and the amount is back.",
    )
    alert_at = models.JSONField(
        default=default_alert_at,
        blank=True,
        help_text="Fractions of the amount at which the owners are alerted, e.g. [0.5, 0.8, 1.0].",
    )
    history = HistoricalRecords()

    class Meta:
        # a total order (ties broken by window and id), the same on every database: the
        # plan lists limits in it, and so do answers and the tightest-limit headers
        ordering = [
            "tenant__slug",
            "feature__slug",
            "pool__slug",
            "model__name",
            "metric",
            "window",
            "id",
        ]
        constraints = [LIMIT_IDENTITY]

    def __str__(self) -> str:
        return limit_describe(self)

    def clean(self) -> None:
        limit_validate(self)

    @property
    def is_budget(self) -> bool:
        return self.window in (Window.HOUR, Window.DAY, Window.MONTH)

    @property
    def amount_value(self) -> Decimal | None:
        return self.amount

    def boost_active(self, now: datetime) -> bool:
        return boost_active(self.boost_amount, self.boost_until, now)

    def amount_at(self, now: datetime) -> Decimal | None:
        """The cap in force at `now`: the boosted amount while a boost lasts, unless the
        amount has since been raised above it."""
        return amount_at(self.amount, self.boost_amount, self.boost_until, now)


class ApiKey(models.Model):
    """A tenant's credential for the reservation API. Only an HMAC of the secret is kept."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    features = models.ManyToManyField(
        Feature,
        blank=True,
        related_name="api_keys",
        help_text="Narrow the key to these features; none means every feature of the tenant.",
    )
    name = models.CharField(max_length=200, blank=True)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    hashed_secret = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)
    history = HistoricalRecords(
        excluded_fields=["hashed_secret", "last_used_at"], m2m_fields=[features]
    )

    class Meta:
        ordering = ["tenant__slug", "name"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name or 'key'} ({self.prefix}…)"

    def clean(self) -> None:
        if self.revoked_at is not None and self.created_at and self.revoked_at < self.created_at:
            raise ValidationError({"revoked_at": "A key cannot be revoked before it was created."})


class ConfigVersion(models.Model):
    """A single row, bumped after every change to the configuration commits.

    Redis holds the version that web processes compare on every call, bumped at the same
    moment; a Redis blip then loses that bump but not this one, so a process checks this row
    once a minute (one query) and reloads its plan only when it moved."""

    ROW = 1

    number = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"config version {self.number}"

    @classmethod
    def bump(cls) -> int:
        """The number after the bump (read back: another bump may have landed since)."""
        if not cls.objects.filter(pk=cls.ROW).update(number=models.F("number") + 1):
            try:
                with transaction.atomic():
                    cls.objects.create(pk=cls.ROW, number=1)
            except IntegrityError:  # created meanwhile by another change
                cls.objects.filter(pk=cls.ROW).update(number=models.F("number") + 1)
        return cls.read()

    @classmethod
    def read(cls) -> int:
        return cls.objects.filter(pk=cls.ROW).values_list("number", flat=True).first() or 0
