"""What an operator runs against the whole platform: the config file (`quota apply`,
`quota export`) and the `quota` command. It writes every app below it, so it sits above them."""

from __future__ import annotations

from django.apps import AppConfig


class ControlConfig(AppConfig):
    name = "control"
    verbose_name = "Control"
