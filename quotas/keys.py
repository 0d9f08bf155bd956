"""API keys: created once, shown once, stored as a lookup prefix and an HMAC of the whole key."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from quotas.models import ApiKey
from tenants.models import Feature, Tenant

KEY_SCHEME = "qk"
PREFIX_BYTES = 6
SECRET_BYTES = 24
LEASE_DIGEST_CHARS = 16


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    secret: str  # the whole key, shown to the person once and never stored


def api_key_hash(secret: str, *, pepper: str) -> str:
    return hmac.new(pepper.encode(), secret.encode(), hashlib.sha256).hexdigest()


def lease_digest(hashed_secret: str) -> str:
    """What a reservation's lease records of the API key that made it: the first 64 bits of
    the key's stored HMAC. It lets that key alone settle the reservation when the plan cannot
    be loaded, by the HMAC of the key it presents (the pepper is a setting: no SQL). 64 bits
    are beyond guessing one request at a time, and the secret cannot be had back from them."""
    return hashed_secret[:LEASE_DIGEST_CHARS]


def api_key_split(secret: str) -> str | None:
    """The lookup prefix of a presented key, or None when it is not shaped like one of ours."""
    parts = secret.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_SCHEME or not parts[1] or not parts[2]:
        return None
    return parts[1]


@transaction.atomic
def api_key_create(
    *, tenant: Tenant, features: Iterable[Feature] = (), name: str = ""
) -> IssuedKey:
    features = list(features)
    strangers = [f.slug for f in features if f.tenant_id != tenant.pk]
    if strangers:
        raise ValidationError(
            {"features": f"not features of tenant '{tenant.slug}': {', '.join(strangers)}"}
        )
    prefix = secrets.token_hex(PREFIX_BYTES)
    secret = f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}"
    api_key = ApiKey.objects.create(
        tenant=tenant,
        name=name,
        prefix=prefix,
        hashed_secret=api_key_hash(secret, pepper=settings.QUOTA_API_KEY_PEPPER),
    )
    api_key.features.set(features)
    return IssuedKey(api_key=api_key, secret=secret)


def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    return api_key


def api_keys_used(*, last_used_ms: dict[str, int]) -> None:
    """Record when keys were last used, from the usage events (the hot path writes nothing to
    the database). A plain UPDATE that only moves forward: no history record, and no config
    version bump, which would make every process reload its plan."""
    for prefix, at_ms in last_used_ms.items():
        at = datetime.fromtimestamp(at_ms / 1000, tz=UTC)
        ApiKey.objects.filter(prefix=prefix).filter(
            Q(last_used_at__isnull=True) | Q(last_used_at__lt=at)
        ).update(last_used_at=at)
