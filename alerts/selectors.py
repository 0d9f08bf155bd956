"""Reads: firing and unannounced alerts, and where an alert goes (its routes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import Exists, OuterRef, Q, QuerySet

from alerts.models import Alert, Channel
from alerts.transports import email_addresses
from tenants.models import Feature, Tenant


def firing_alerts(kind: str) -> list[Alert]:
    return list(Alert.objects.filter(kind=kind, state=Alert.State.FIRING))


def unannounced_alerts() -> list[Alert]:
    """Alerts whose firing, or resolving, no message has carried yet."""
    pending = Q(fired_in__isnull=True) | Q(state=Alert.State.RESOLVED, resolved_in__isnull=True)
    return list(
        Alert.objects.filter(pending)
        .select_related("tenant", "feature__tenant", "feature__owner", "limit")
        .order_by("fired_at", "id")
    )


def latest_alerts(alerts: QuerySet[Alert]) -> QuerySet[Alert]:
    """Only the latest alert of each rule and subject: an older one that resolved says
    nothing true once the same threshold fired again (a boost ended, usage rose again)."""
    newer = Alert.objects.filter(kind=OuterRef("kind"), subject=OuterRef("subject"))
    return alerts.exclude(Exists(newer.filter(fired_at__gt=OuterRef("fired_at"))))


def alert_group(alert: Alert) -> str:
    """Alerts of one group travel in one message: a feature's, a tenant's own limits', or
    the platform's (limits on a shared pool or model that bind every tenant)."""
    if alert.feature_id is not None:
        return f"feature:{alert.feature_id}"
    if alert.tenant_id is not None:
        return f"tenant:{alert.tenant_id}"
    return "platform"


@dataclass(frozen=True)
class Route:
    kind: str
    target: str  # e-mail addresses, comma-separated, or a URL
    channel: Channel | None = None


def owner_addresses(*, tenant: Tenant | None, feature: Feature | None) -> list[str]:
    """Who owns what an alert is about: a feature's owner, then its tenant's owners (who can
    act on every feature of the tenant); for a tenant's own limits its owners; for shared
    capacity, the platform's superusers. Each address once, whatever its case."""
    if feature is not None:
        first = [feature.owner.email] if feature.owner.email else []
        return _once([*first, *sorted(u.email for u in feature.tenant.owners.all())])
    users = tenant.owners.all() if tenant is not None else _superusers()
    return _once(sorted(u.email for u in users))


def _once(addresses: list[str]) -> list[str]:
    seen: set[str] = set()
    result = []
    for address in addresses:
        if address and address.lower() not in seen:
            seen.add(address.lower())
            result.append(address)
    return result


def _superusers() -> list[Any]:
    return list(get_user_model().objects.filter(is_superuser=True, is_active=True))


def routes_for(*, tenant: Tenant | None, feature: Feature | None) -> list[Route]:
    """The owners' e-mail, then every enabled channel of the feature and of its tenant;
    a channel that would repeat a message to the same target is left out."""
    owners = owner_addresses(tenant=tenant, feature=feature)
    routes = [Route("email", ",".join(owners))] if owners else []
    for channel in _channels(tenant=tenant, feature=feature):
        target = channel.target or (",".join(owners) if channel.kind == "email" else "")
        if target:
            routes.append(Route(channel.kind, target, channel))
    return _distinct(routes)


def _channels(*, tenant: Tenant | None, feature: Feature | None) -> list[Channel]:
    channels = Channel.objects.filter(enabled=True, tenant=tenant)
    if feature is None:
        channels = channels.filter(feature__isnull=True)
    else:
        channels = channels.filter(Q(feature__isnull=True) | Q(feature=feature))
    return list(channels.order_by("name"))


def _distinct(routes: list[Route]) -> list[Route]:
    seen: set[tuple[str, str]] = set()
    result = []
    for route in routes:
        identity = (route.kind, _normalised(route))
        if identity not in seen:
            seen.add(identity)
            result.append(route)
    return result


def _normalised(route: Route) -> str:
    if route.kind == "email":
        return ",".join(sorted(a.lower() for a in email_addresses(route.target)))
    return route.target
