"""Messages rendered from templates (alerts/templates/alerts/): an e-mail (text and HTML), a
Slack Block Kit payload, and the JSON a webhook receives. Words live in the templates; this
module only prepares the numbers they show."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.template.loader import render_to_string
from django.urls import reverse

from alerts.models import Alert, Channel, Notification
from alerts.transports import Message
from quotas.models import Limit
from quotas.plan import NANO
from quotas.validation import METRIC_WORDS
from tenants.models import Feature

BAR_CELLS = 20


def notification_message(
    *, notification: Notification, fired: list[Alert], resolved: list[Alert]
) -> Message:
    items = [_item(a, "fired") for a in fired] + [_item(a, "resolved") for a in resolved]
    shown = _collapsed(items)
    context = {
        "notification": notification,
        "tenant": notification.tenant,
        "feature": notification.feature,
        "items": shown,
        "fired_count": sum(1 for i in shown if i["transition"] == "fired"),
        "resolved_count": sum(1 for i in shown if i["transition"] == "resolved"),
        "test": False,
        "site_url": settings.SITE_URL,
        "alerts_link": _link(reverse("admin:alerts_alert_changelist")),
    }
    data = {
        "type": "alerts",
        "group": notification.group,
        "tenant": notification.tenant.slug if notification.tenant else None,
        "feature": notification.feature.slug if notification.feature else None,
        "sent_at": notification.created_at.isoformat(),
        "alerts": [_item_data(item) for item in items],
    }
    return _render(context, data)


def test_message(*, channel: Channel, now: datetime) -> Message:
    context = {
        "tenant": channel.tenant,
        "feature": channel.feature,
        "channel": channel,
        "items": [],
        "test": True,
        "site_url": settings.SITE_URL,
        "alerts_link": _link(reverse("admin:alerts_alert_changelist")),
    }
    data = {"type": "test", "channel": channel.name, "sent_at": now.isoformat(), "alerts": []}
    return _render(context, data)


def channel_disabled_message(*, channel: Channel, error: str) -> Message:
    context = {
        "channel": channel,
        "error": error,
        "link": _link(reverse("admin:alerts_channel_change", args=[channel.pk])),
    }
    subject = _line(render_to_string("alerts/channel_disabled_subject.txt", context))
    text = render_to_string("alerts/channel_disabled.txt", context)
    html = render_to_string("alerts/channel_disabled.html", context)
    return Message(subject=subject, text=text, html=html, slack={}, data={})


def _render(context: dict[str, Any], data: dict[str, Any]) -> Message:
    subject = _line(render_to_string("alerts/subject.txt", context))
    context = {**context, "subject": subject}
    slack = json.loads(render_to_string("alerts/slack.json", context))
    return Message(
        subject=subject,
        text=render_to_string("alerts/email.txt", context),
        html=render_to_string("alerts/email.html", context),
        slack=slack,
        data={**data, "subject": subject},
    )


def _line(text: str) -> str:
    return " ".join(text.split())


def _link(path: str) -> str:
    return settings.SITE_URL.rstrip("/") + path


def _collapsed(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a person reads: one line per limit and transition (the highest threshold crossed
    names the others; a forecast fired with a threshold is said in the threshold's line).
    Webhooks still get every alert."""
    thresholds: dict[tuple[Any, str], list[dict[str, Any]]] = {}
    for item in items:
        if item["kind"] == "threshold":
            thresholds.setdefault((item["alert"].limit_id, item["transition"]), []).append(item)
    shown = []
    for item in items:
        alert, transition = item["alert"], item["transition"]
        group = thresholds.get((alert.limit_id, transition), [])
        if item["kind"] == "forecast" and transition == "fired" and group:
            continue
        if item["kind"] == "threshold":
            top = max(group, key=lambda i: i["alert"].level)
            if item is not top:
                continue
            levels = sorted(i["level_percent"] for i in group)
            item = {**item, "levels": [f"{level}%" for level in levels]}
            item["title"] = _line(render_to_string("alerts/item_title.txt", item))
        shown.append(item)
    return shown


def _item(alert: Alert, transition: str) -> dict[str, Any]:
    details = alert.details or {}
    fraction = float(details.get("fraction", 0.0))
    item: dict[str, Any] = {
        "alert": alert,
        "kind": alert.kind,
        "transition": transition,
        "details": details,
        "level_percent": _percent(alert.level),
        "percent": _percent(fraction),
        "share_percent": _percent(float(details.get("share", 0.0))),
        "baseline_percent": _percent(float(details.get("baseline_share", 0.0))),
        "bar": _bar(fraction),
        "bar_width": min(100, _percent(fraction)),
        "link": _alert_link(alert),
        "refusing": alert.refusing if transition == "fired" else bool(details.get("refusing")),
        "actions": _actions(alert) if transition == "fired" else [],
    }
    item.update(_amounts(details))
    item["title"] = _line(render_to_string("alerts/item_title.txt", item))
    item["detail"] = render_to_string("alerts/item_detail.txt", item).strip()
    return item


def _amounts(details: dict[str, Any]) -> dict[str, str]:
    metric = str(details.get("metric", ""))
    if not metric:
        return {}
    zone = ZoneInfo(str(details.get("timezone") or "UTC"))
    result = {
        "used_text": _quantity(metric, float(details.get("used", 0))),
        "cap_text": _quantity(metric, float(details.get("cap", 0))),
        "remaining_text": _quantity(
            metric, max(0.0, float(details.get("cap", 0)) - float(details.get("used", 0)))
        ),
    }
    for name in ("reset_ms", "runs_out_ms"):
        if details.get(name):
            moment = datetime.fromtimestamp(int(details[name]) / 1000, zone)
            result[name.replace("_ms", "_text")] = f"{moment:%Y-%m-%d %H:%M} {zone.key}"
    return result


def _quantity(metric: str, units: float) -> str:
    if metric == "cost_usd":
        dollars = units / float(NANO)
        if dollars >= 1 or dollars == 0:
            return f"${dollars:,.2f}"
        return "$" + f"{dollars:.6f}".rstrip("0")  # a budget of a tenth of a cent reads so
    return f"{int(units):,} {METRIC_WORDS.get(metric, metric)}"


def _percent(fraction: float) -> int:
    return round(fraction * 100)


def _bar(fraction: float) -> str:
    filled = max(0, min(BAR_CELLS, round(fraction * BAR_CELLS)))
    return "█" * filled + "░" * (BAR_CELLS - filled)


def _alert_link(alert: Alert) -> str:
    if alert.kind == "dead_letters":
        return _link(reverse("admin:ledger_deadletter_changelist"))
    if alert.limit_id is not None:
        return _link(reverse("admin:quotas_limit_change", args=[alert.limit_id]))
    if alert.feature_id is not None:
        return _link(reverse("admin:tenants_feature_change", args=[alert.feature_id]))
    return _link(reverse("admin:alerts_alert_change", args=[alert.pk]))


def _actions(alert: Alert) -> list[dict[str, str]]:
    """What the owner can do about a firing alert, each a link to the admin page that does
    it: boost or raise the limit that binds, pause the feature that uses it most."""
    details = alert.details or {}
    limit = alert.limit
    if alert.kind == "refusal_spike":
        refused_by = details.get("refused_by") or [{}]
        limit = Limit.objects.filter(pk=refused_by[0].get("limit_id") or 0).first()
    actions = []
    if limit is not None and limit.amount is not None:
        name = str(limit)
        boost = reverse("admin:quotas_limit_boost", args=[limit.pk])
        raise_ = reverse("admin:quotas_limit_change", args=[limit.pk])
        actions.append({"label": f"Boost {name} for a few hours", "url": _link(boost)})
        actions.append({"label": f"Raise {name}", "url": _link(raise_)})
    feature = _feature_named(str(details.get("noisy_feature", ""))) or alert.feature
    if feature is not None:
        page = reverse("admin:tenants_feature_change", args=[feature.pk])
        actions.append({"label": f"Pause {feature} (its page)", "url": _link(page)})
    return actions


def _feature_named(name: str) -> Feature | None:
    tenant, _, slug = name.partition("/")
    if not slug:
        return None
    return Feature.objects.select_related("tenant").filter(tenant__slug=tenant, slug=slug).first()


def _item_data(item: dict[str, Any]) -> dict[str, Any]:
    alert: Alert = item["alert"]
    return {
        "id": alert.pk,
        "kind": alert.kind,
        "state": item["transition"],
        "title": item["title"],
        "tenant": alert.tenant.slug if alert.tenant else None,
        "feature": alert.feature.slug if alert.feature else None,
        "limit": alert.limit_id,
        "level": alert.level,
        "refusing": item["refusing"],
        "actions": item["actions"],
        "fired_at": alert.fired_at.isoformat(),
        "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
        "resolve_reason": alert.resolve_reason or None,
        "details": item["details"],
        "link": item["link"],
    }
