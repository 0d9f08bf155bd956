"""The durable usage ledger: what Redis decided, kept in the database of record.

Times are epoch milliseconds, as the engine writes them: a reservation's usage belongs to the
calendar period of the moment it was *reserved* (the engine debits that period's key and the
commit settles the same key), so rebuilds and drift reports compare milliseconds with the
period bounds of `quotas.engine.periods` without any time-zone round trip.
"""

from __future__ import annotations

from datetime import UTC, datetime

from django.db import models


def ms_to_datetime(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


class UsageEvent(models.Model):
    """One reservation: its state moves held -> committed | released | expired (and
    expired -> committed for a commit after expiry), whichever order the events arrive in."""

    class State(models.TextChoices):
        HELD = "held"
        COMMITTED = "committed"
        RELEASED = "released"
        EXPIRED = "expired"

    rid = models.CharField("reservation id", max_length=64, unique=True)
    state = models.CharField(max_length=10, choices=State.choices)
    tenant = models.CharField(max_length=64, blank=True)
    feature = models.CharField(max_length=64, blank=True)
    pool = models.CharField(max_length=64, blank=True)
    model = models.CharField(max_length=128, blank=True)
    priority = models.CharField(max_length=16, blank=True)
    api_key = models.CharField("API key prefix", max_length=16, blank=True)
    # Ids as the configuration knew them at ingest, so that a renamed slug keeps its rows.
    tenant_pk = models.IntegerField(null=True, blank=True)
    feature_pk = models.IntegerField(null=True, blank=True)
    pool_pk = models.IntegerField(null=True, blank=True)
    model_pk = models.IntegerField(null=True, blank=True)
    reserved_input_tokens = models.BigIntegerField(null=True, blank=True)
    reserved_output_tokens = models.BigIntegerField(null=True, blank=True)
    reserved_cost_nusd = models.BigIntegerField(null=True, blank=True)
    input_tokens = models.BigIntegerField(null=True, blank=True)
    cached_input_tokens = models.BigIntegerField(null=True, blank=True)
    output_tokens = models.BigIntegerField(null=True, blank=True)
    cost_nusd = models.BigIntegerField("cost (nano-USD)", null=True, blank=True)
    finish_reason = models.CharField(max_length=32, blank=True)
    upstream_status = models.IntegerField(null=True, blank=True)
    latency_ms = models.IntegerField(null=True, blank=True)
    wait_ms = models.IntegerField(
        null=True, blank=True, help_text="Reservation wait reported by the caller (metadata)."
    )
    promised_wait_ms = models.IntegerField(
        null=True, blank=True, help_text="A scheduled reservation's wait in line, as promised."
    )
    actual_wait_ms = models.IntegerField(
        null=True,
        blank=True,
        help_text="From the reservation to the provider call's start (the commit's time less "
        "its latency), when the caller reported a latency.",
    )
    would_refuse = models.CharField(
        max_length=200, blank=True, help_text="Soft or shadow limits that would have refused."
    )
    lease_expired = models.BooleanField(default=False)
    degraded = models.BooleanField(default=False)
    estimated = models.BooleanField(default=False)
    metadata = models.JSONField(null=True, blank=True)
    created_ms = models.BigIntegerField(null=True, blank=True)
    expires_ms = models.BigIntegerField(
        null=True,
        blank=True,
        help_text="When the lease was to expire, as last granted (by the reservation or the "
        "latest extension).",
    )
    expiry_granted_ms = models.BigIntegerField(
        null=True,
        blank=True,
        help_text="When that expiry was granted: the time of the event that set it.",
    )
    finished_ms = models.BigIntegerField(null=True, blank=True)
    ingested_ms = models.BigIntegerField()

    class Meta:
        indexes = [
            models.Index(fields=["created_ms"], name="ledger_usage_created"),
            models.Index(fields=["ingested_ms"], name="ledger_usage_ingested"),
        ]

    def __str__(self) -> str:
        return f"{self.rid} {self.state}"

    @property
    def created_at(self) -> datetime | None:
        return ms_to_datetime(self.created_ms)

    @property
    def finished_at(self) -> datetime | None:
        return ms_to_datetime(self.finished_ms)


class Refusal(models.Model):
    """One refused reservation. A slim row of its own (kept for a short retention) because
    counting refusals exactly once needs a key to be idempotent on: the reservation id."""

    rid = models.CharField("reservation id", max_length=64, unique=True)
    at_ms = models.BigIntegerField()
    tenant = models.CharField(max_length=64, blank=True)
    feature = models.CharField(max_length=64, blank=True)
    model = models.CharField(max_length=128, blank=True)
    priority = models.CharField(max_length=16, blank=True)
    reason = models.CharField(max_length=20)
    limit_id = models.IntegerField(null=True, blank=True)
    ingested_ms = models.BigIntegerField()

    class Meta:
        indexes = [
            models.Index(fields=["at_ms"], name="ledger_refusal_at"),
            models.Index(fields=["ingested_ms"], name="ledger_refusal_ingested"),
        ]

    def __str__(self) -> str:
        return f"{self.rid} {self.reason}"


class PoolEvent(models.Model):
    """A change in how a pool follows its provider, as the engine decided it: its adaptive
    share moved (`adapted`), its breaker opened or closed, or the provider stated a limit
    below the configured one. Keyed by the stream entry, so an entry read twice is one row."""

    class Kind(models.TextChoices):
        ADAPTED = "adapted", "adapted"
        BREAKER_OPENED = "breaker_opened", "breaker opened"
        BREAKER_CLOSED = "breaker_closed", "breaker closed"
        PROVIDER_LIMIT = "provider_limit", "provider limit"

    entry_id = models.CharField("stream entry id", max_length=64, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    pool = models.CharField(max_length=64)
    pool_pk = models.IntegerField(null=True, blank=True)
    at_ms = models.BigIntegerField()
    share = models.FloatField(null=True, blank=True, help_text="adapted: the share now.")
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        indexes = [models.Index(fields=["pool", "at_ms"], name="ledger_poolevent_pool_at")]

    def __str__(self) -> str:
        return f"{self.pool} {self.kind}"

    @property
    def at(self) -> datetime | None:
        return ms_to_datetime(self.at_ms)


class DeadLetter(models.Model):
    """A stream entry the ledger could not store (a value the database refuses), parked so
    that the rest of its batch is written and the stream moves on. `fields` is the entry as
    received, as JSON with every character outside ASCII escaped (NUL, lone surrogates from
    bytes that were not UTF-8), which any database stores; it can be read back exactly with
    `json.loads`."""

    entry_id = models.CharField("stream entry id", max_length=64, unique=True)
    rid = models.CharField("reservation id", max_length=64, blank=True)
    event_type = models.CharField("type", max_length=16, blank=True)
    tenant = models.CharField(max_length=64, blank=True)
    fields = models.TextField(help_text="The entry's fields as received (escaped JSON).")
    error = models.TextField()
    parked_at = models.DateTimeField()

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.entry_id} {self.event_type}"


class Grain(models.TextChoices):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"


class UsageRollup(models.Model):
    """Usage per minute, hour or day (UTC) for one tenant, feature, pool and model."""

    grain = models.CharField(max_length=6, choices=Grain.choices)
    start = models.DateTimeField()
    tenant = models.CharField(max_length=64, blank=True)
    feature = models.CharField(max_length=64, blank=True)
    pool = models.CharField(max_length=64, blank=True)
    model = models.CharField(max_length=128, blank=True)
    requests = models.BigIntegerField(default=0)
    input_tokens = models.BigIntegerField(default=0)
    cached_input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cost_nusd = models.BigIntegerField("cost (nano-USD)", default=0)
    refused_rate_limited = models.BigIntegerField(default=0)
    refused_budget_exhausted = models.BigIntegerField(default=0)
    refused_concurrency = models.BigIntegerField(default=0)
    truncated = models.BigIntegerField(default=0, help_text="Commits with finish_reason=length.")
    upstream_429 = models.BigIntegerField(default=0)
    expired = models.BigIntegerField(default=0)
    released = models.BigIntegerField(default=0)
    would_refuse = models.BigIntegerField(default=0)
    wait_p50_ms = models.IntegerField(null=True, blank=True)
    wait_p95_ms = models.IntegerField(null=True, blank=True)
    wait_histogram = models.JSONField(default=dict, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["grain", "start", "tenant", "feature", "pool", "model"],
                name="ledger_rollup_unique",
            )
        ]
        indexes = [
            models.Index(fields=["grain", "start"], name="ledger_rollup_grain_start"),
            # ledger.usage_reads: one feature's hours and days; a pool's hours; the hours
            # with a truncation, where any rise in truncation shows. Requests and truncations
            # are key columns (not INCLUDE, which SQLite lacks) so that the rising-truncation
            # read is index-only.
            models.Index(
                fields=["tenant", "feature", "grain", "start", "requests", "truncated"],
                name="ledger_rollup_feature",
            ),
            models.Index(fields=["pool", "grain", "start"], name="ledger_rollup_pool"),
            models.Index(
                fields=["grain", "start", "tenant", "feature"],
                condition=models.Q(truncated__gt=0),
                name="ledger_rollup_truncated",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.grain} {self.start:%Y-%m-%d %H:%M} {self.tenant}/{self.feature}"


class LedgerState(models.Model):
    """A single row. Every ingest transaction updates it first, so holding it (in a drift
    report) is a moment at which no batch can commit; it also keeps the rollup watermark."""

    ingested_total = models.BigIntegerField(default=0)
    last_ingest_ms = models.BigIntegerField(null=True, blank=True)
    rollup_watermark_ms = models.BigIntegerField(null=True, blank=True)

    def __str__(self) -> str:
        return "ledger state"


class ProviderUsage(models.Model):
    """A provider's own account of one pool's usage of one model on one day (UTC)."""

    class Source(models.TextChoices):
        OPENAI = "openai"
        ANTHROPIC = "anthropic"

    pool = models.CharField(max_length=64)
    source = models.CharField(max_length=16, choices=Source.choices)
    day = models.DateField()
    model = models.CharField(max_length=128)
    requests = models.BigIntegerField(null=True, blank=True)
    input_tokens = models.BigIntegerField(default=0)
    cached_input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cost_nusd = models.BigIntegerField("cost (nano-USD)", null=True, blank=True)
    imported_from = models.CharField(max_length=255, blank=True)
    imported_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["pool", "day", "model"], name="ledger_provider_usage_unique"
            )
        ]
        ordering = ["pool", "day", "model"]

    def __str__(self) -> str:
        return f"{self.pool} {self.day} {self.model}"
