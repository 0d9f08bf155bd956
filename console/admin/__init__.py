"""Every app's admin, registered on the console's site: Django's autodiscovery imports this
module (the console is the app that assembles the admin), and each import below registers the
ModelAdmins of one app. Which rows an owner sees is decided in `console.scoping`."""

from __future__ import annotations

from console.admin import alerts, ledger, providers, quotas, tenants

__all__ = ["alerts", "ledger", "providers", "quotas", "tenants"]
