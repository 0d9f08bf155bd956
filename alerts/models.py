"""Alerting: where messages go (channels), how rules are tuned (rules), what fired (alerts),
what was sent together (notifications) and how each sending went (deliveries).

Every row names its tenant, so `console.scoping` can isolate owners with one lookup;
rows without a tenant (alerts about a pool's own capacity, platform channels) belong to the
platform and are seen by superusers only.
"""

from __future__ import annotations

import secrets
from typing import Any

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q

from alerts.transports import channel_kind_choices, transport_class
from quotas.models import Limit
from tenants.models import Feature, Tenant


class RuleKind(models.TextChoices):
    THRESHOLD = "threshold", "budget threshold"
    FORECAST = "forecast", "budget forecast"
    REFUSAL_SPIKE = "refusal_spike", "refusal spike"
    TRUNCATION = "truncation", "silent truncation"
    UPSTREAM_429 = "upstream_429", "upstream 429s"
    EXPIRED_LEASES = "expired_leases", "expired leases"
    WOULD_REFUSE = "would_refuse", "soft/shadow limit would refuse"
    DEAD_LETTERS = "dead_letters", "ledger dead letters"
    BREAKER_OPEN = "breaker_open", "pool breaker open"
    POOL_SHARE = "pool_share", "pool share low"
    PROVIDER_LIMIT = "provider_limit", "provider limit below configured"


class Channel(models.Model):
    """A place alerts go besides the owner's e-mail: more addresses, a Slack incoming
    webhook, or a signed JSON webhook. On a feature, it hears that feature's alerts; on a
    tenant (no feature), every alert of the tenant."""

    tenant = models.ForeignKey(
        Tenant,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="alert_channels",
        help_text="Empty: a platform channel, for alerts about shared pools (superusers only).",
    )
    feature = models.ForeignKey(
        Feature,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="alert_channels",
        help_text="Only this feature's alerts; empty: every alert of the tenant.",
    )
    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=16, choices=channel_kind_choices)
    target = models.CharField(
        max_length=500,
        blank=True,
        help_text="E-mail: addresses separated by commas (empty: the owners). "
        "Slack and webhook: the URL to post to.",
    )
    secret = models.CharField(
        max_length=64,
        blank=True,
        help_text="Webhook signing key (HMAC-SHA256); generated when left empty.",
    )
    enabled = models.BooleanField(default=True)
    disabled_reason = models.TextField(blank=True)
    disabled_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tenant__slug", "name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="alert_channel_name_unique"),
            models.UniqueConstraint(
                fields=["name"],
                condition=Q(tenant__isnull=True),
                name="alert_platform_channel_name_unique",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.kind})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.kind == "webhook" and not self.secret:
            self.secret = secrets.token_hex(32)  # the receiver needs it before the first alert
        super().save(*args, **kwargs)

    def clean(self) -> None:
        if self.feature is not None and self.feature.tenant_id != self.tenant_id:
            raise ValidationError({"feature": "The feature must belong to the channel's tenant."})
        if self.kind:
            transport_class(self.kind).validate_target(self.target)


class AlertRule(models.Model):
    """Overrides a rule's defaults (`alerts.rules.DEFAULTS`) for a tenant, or for one feature
    of it; a feature's own rule wins over its tenant's."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="alert_rules")
    feature = models.ForeignKey(
        Feature, null=True, blank=True, on_delete=models.CASCADE, related_name="alert_rules"
    )
    kind = models.CharField(max_length=16, choices=RuleKind.choices)
    enabled = models.BooleanField(default=True)
    threshold = models.DecimalField(
        max_digits=8,
        decimal_places=4,
        null=True,
        blank=True,
        help_text="A share (0.2 = 20% of reservations refused) or, for silent truncation, "
        "how many times its baseline the truncated share must be. Empty: the default.",
    )
    window_minutes = models.PositiveIntegerField(
        null=True, blank=True, help_text="The window the rate is measured over."
    )
    min_events = models.PositiveIntegerField(
        null=True, blank=True, help_text="Fewer events than this in the window never alert."
    )

    class Meta:
        ordering = ["tenant__slug", "feature__slug", "kind"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "feature", "kind"], name="alert_rule_unique_per_feature"
            ),
            models.UniqueConstraint(
                fields=["tenant", "kind"],
                condition=Q(feature__isnull=True),
                name="alert_rule_unique_per_tenant",
            ),
        ]

    def __str__(self) -> str:
        where = f"{self.tenant}/{self.feature.slug}" if self.feature else str(self.tenant)
        return f"{self.get_kind_display()} for {where}"

    def clean(self) -> None:
        if self.feature is not None and self.feature.tenant_id != self.tenant_id:
            raise ValidationError({"feature": "The feature must belong to the rule's tenant."})


class Notification(models.Model):
    """One message: every alert of one group (a feature, a tenant, or the platform) that
    fired or resolved, sent at most once per group and storm window (the unique constraint
    is the claim)."""

    group = models.CharField(max_length=64)
    window_start = models.DateTimeField()
    tenant = models.ForeignKey(Tenant, null=True, blank=True, on_delete=models.CASCADE)
    feature = models.ForeignKey(Feature, null=True, blank=True, on_delete=models.CASCADE)
    subject = models.CharField(max_length=300, blank=True)
    message = models.JSONField(
        default=dict, blank=True, help_text="As rendered, so a delivery can be sent again."
    )
    urgent = models.BooleanField(
        default=False,
        help_text="Carried alerts that mean calls are refused now: sent at once, outside the "
        "storm window.",
    )
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["group", "window_start"],
                condition=Q(urgent=False),
                name="alert_notification_once_per_window",
            )
        ]

    def __str__(self) -> str:
        return self.subject or f"{self.group} at {self.window_start:%Y-%m-%d %H:%M}"


class Alert(models.Model):
    """One condition that fired, kept until it resolves. `key` is the claim: a threshold's
    key names its limit, level, period and how many times it fired in that period before, so
    however many workers evaluate it fires once per crossing; and one alert per rule and
    subject may be firing at a time (the partial constraint)."""

    class State(models.TextChoices):
        FIRING = "firing"
        RESOLVED = "resolved"

    key = models.CharField(max_length=200, unique=True)
    kind = models.CharField(max_length=16, choices=RuleKind.choices)
    subject = models.CharField(max_length=100, help_text="What it is about: limit:12@0.8.")
    tenant = models.ForeignKey(
        Tenant, null=True, blank=True, on_delete=models.CASCADE, related_name="alerts"
    )
    feature = models.ForeignKey(
        Feature, null=True, blank=True, on_delete=models.CASCADE, related_name="alerts"
    )
    limit = models.ForeignKey(
        Limit, null=True, blank=True, on_delete=models.SET_NULL, related_name="alerts"
    )
    state = models.CharField(max_length=8, choices=State.choices, default=State.FIRING)
    level = models.FloatField(help_text="The threshold or rate that was crossed.")
    refusing = models.BooleanField(
        default=False,
        help_text="Calls are being refused now (a hard limit at 100%): announced at once, "
        "outside the storm window, and so is its resolve.",
    )
    period_start = models.DateTimeField(null=True, blank=True)
    period_end = models.DateTimeField(null=True, blank=True)
    fired_at = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolve_reason = models.CharField(max_length=100, blank=True)
    details = models.JSONField(default=dict, blank=True)
    fired_in = models.ForeignKey(
        Notification, null=True, blank=True, on_delete=models.SET_NULL, related_name="fired"
    )
    resolved_in = models.ForeignKey(
        Notification, null=True, blank=True, on_delete=models.SET_NULL, related_name="resolved"
    )

    class Meta:
        ordering = ["-fired_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["kind", "subject"],
                condition=Q(state="firing"),
                name="alert_one_firing_per_subject",
            )
        ]
        indexes = [models.Index(fields=["state", "kind"], name="alert_state_kind")]

    def __str__(self) -> str:
        """The alert in words, as a person reads it in a list: "100% of acme / chat: 10,000
        tokens per day", "refusal spike: acme/chat"."""
        about = (self.details or {}).get("limit_name") or self._about()
        if self.kind == RuleKind.THRESHOLD:
            return f"{round(self.level * 100)}% of {about}"
        return f"{self.get_kind_display()}: {about}"

    def _about(self) -> str:
        if self.feature_id is not None:
            return str(self.feature)
        if self.tenant_id is not None:
            return str(self.tenant)
        return "the ledger" if self.kind == RuleKind.DEAD_LETTERS else "shared capacity"


class Delivery(models.Model):
    """One sending of one notification (or test) through one route, as it went."""

    class Status(models.TextChoices):
        PENDING = "pending"
        SENDING = "sending"
        SENT = "sent"
        FAILED = "failed"

    notification = models.ForeignKey(
        Notification,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="deliveries",
    )
    channel = models.ForeignKey(
        Channel, null=True, blank=True, on_delete=models.SET_NULL, related_name="deliveries"
    )
    tenant = models.ForeignKey(Tenant, null=True, blank=True, on_delete=models.CASCADE)
    kind = models.CharField(max_length=16)
    target = models.CharField(max_length=500, help_text="Addresses, or the URL's host.")
    purpose = models.CharField(
        max_length=16, default="alert", help_text="alert, test or channel_disabled."
    )
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    error = models.TextField(blank=True)
    permanent = models.BooleanField(default=False)
    attempts = models.PositiveSmallIntegerField(default=0)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "deliveries"
        indexes = [models.Index(fields=["status"], name="alert_delivery_status")]

    def __str__(self) -> str:
        return f"{self.kind} to {self.target}: {self.status}"
