"""Filters for the machine-read message templates (Slack Block Kit JSON)."""

from __future__ import annotations

import json
from typing import Any

from django import template
from django.utils.safestring import SafeString, mark_safe

register = template.Library()


@register.filter(name="json")
def as_json(value: Any) -> SafeString:
    """A JSON literal: templates build the structure, values are never spliced in raw."""
    return mark_safe(json.dumps(str(value) if not isinstance(value, int | float) else value))


@register.filter
def slack(value: Any) -> str:
    """Slack's mrkdwn treats &, < and > as markup: escape them as Slack asks."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
