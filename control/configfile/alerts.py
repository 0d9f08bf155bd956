"""Alert channels in the config file: the `alert_channels` section.

    alert_channels:
      - {tenant: acme, name: ops-slack, kind: slack, url: https://hooks.slack.com/services/...}
      - {tenant: acme, feature: chat, name: pager, kind: webhook, url: https://..., secret: s3cret}
      - {tenant: acme, name: finance, kind: email, to: [finance@acme.example]}

A channel is identified by its tenant and name (no tenant: a platform channel, for alerts
about shared pools). E-mail channels take `to` (none: the owners), Slack and webhook channels
take `url`. A webhook's signing `secret` may be given; left out, the stored one is kept (one
is generated for a new channel), and `export` never prints it. `export` prints a Slack URL
with its token replaced by REDACTED, and a webhook URL with its user info and query values
replaced so, and `apply` of such a URL keeps the stored one, so an exported file applies as
it is and a file under version control need not hold the token.
With `prune`, channels of the file's tenants that the file does not declare are deleted.
"""

from __future__ import annotations

from typing import Any

from alerts.models import Channel
from alerts.services import REDACTED, channel_target_redacted, channel_upsert
from control.configfile.apply import Applier, Skip
from control.configfile.report import Change
from control.configfile.schema import Entry
from tenants.models import Feature, Tenant

KIND = "alert channel"


def apply_alert_channels(
    applier: Applier, entries: list[Entry], *, prune: bool, tenants: set[str]
) -> None:
    kept: set[int] = set()
    for entry in entries:
        channel = _channel(applier, entry)
        if channel is not None:
            kept.add(channel.pk)
    if prune:
        stale = Channel.objects.filter(tenant__slug__in=tenants).exclude(pk__in=kept)
        for channel in stale.select_related("tenant"):
            applier.report.add(Change("deleted", KIND, _label(channel)))
            channel.delete()


def _channel(applier: Applier, entry: Entry) -> Channel | None:
    data = entry.data
    key = (data.get("tenant"), data.get("name"))
    try:
        if not entry.valid:
            raise Skip
        applier.declare(KIND, key, entry.path, f"alert channel '{key[1]}'")
        tenant, feature = _scope(applier, entry)
        target, target_key = _target(applier, entry, tenant)
    except Skip:
        applier.skip(KIND, key, entry.path)
        return None
    values = {
        "tenant": tenant,
        "name": data["name"],
        "kind": data["kind"],
        "target": target,
        "feature": feature,
        "secret": data.get("secret"),
    }
    result = applier.attempt(
        KIND, key, entry.path, lambda: channel_upsert(**values), {"target": target_key}
    )
    if result is None:
        return None
    applier.record(KIND, result, {"target": target_key}, _label(result.obj))
    return result.obj


def _scope(applier: Applier, entry: Entry) -> tuple[Tenant | None, Feature | None]:
    slug, feature_slug = entry.data.get("tenant"), entry.data.get("feature")
    tenant = applier.tenant_named(slug, f"{entry.path}.tenant") if slug else None
    if feature_slug is None:
        return tenant, None
    if tenant is None:
        applier.errors.add(f"{entry.path}.feature", "a feature's channel names its tenant")
        raise Skip
    return tenant, applier.feature_of(tenant, feature_slug, f"{entry.path}.feature")


def _target(applier: Applier, entry: Entry, tenant: Tenant | None) -> tuple[str, str]:
    """The channel's target, and the key of the file it comes from."""
    data, path = entry.data, entry.path
    wanted, unwanted = ("to", "url") if data["kind"] == "email" else ("url", "to")
    if unwanted in data:
        applier.errors.add(f"{path}.{unwanted}", f"{data['kind']} channels take '{wanted}'")
        raise Skip
    if wanted == "to":
        return ", ".join(data.get("to", [])), "to"
    if "url" not in data:
        applier.errors.add(f"{path}.url", "missing (required)")
        raise Skip
    url = str(data["url"])
    if REDACTED in url:
        return _stored_url(applier, entry, tenant, url), "url"
    return url, "url"


def _stored_url(applier: Applier, entry: Entry, tenant: Tenant | None, redacted: str) -> str:
    """The stored URL a redacted one stands for: the same channel's, if it redacts alike."""
    kind = entry.data["kind"]
    stored = Channel.objects.filter(tenant=tenant, name=entry.data["name"], kind=kind).first()
    if stored is None or channel_target_redacted(kind, stored.target) != redacted:
        applier.errors.add(
            f"{entry.path}.url",
            f"a URL with {REDACTED} in it keeps the stored one, and this channel has no "
            "stored URL like it: give the full URL",
        )
        raise Skip
    return stored.target


def _label(channel: Channel) -> str:
    return f"{channel.tenant.slug if channel.tenant else '(platform)'}/{channel.name}"


def alert_channels_export() -> list[dict[str, Any]]:
    channels = Channel.objects.select_related("tenant", "feature").order_by("tenant__slug", "name")
    return [_exported(channel) for channel in channels]


def _exported(channel: Channel) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if channel.tenant is not None:
        entry["tenant"] = channel.tenant.slug
    if channel.feature is not None:
        entry["feature"] = channel.feature.slug
    entry.update(name=channel.name, kind=channel.kind)
    if channel.kind == "email":
        if channel.target:
            entry["to"] = [a.strip() for a in channel.target.split(",") if a.strip()]
    else:
        entry["url"] = channel_target_redacted(channel.kind, channel.target)
    return entry
