from __future__ import annotations

from django.apps import AppConfig


class LedgerConfig(AppConfig):
    name = "ledger"
    verbose_name = "Usage ledger"

    def ready(self) -> None:
        from ledger.recovery import lease_from_ledger
        from ledger.tasks import ledger_store_rebuild
        from quotas.recovery import recovery_register

        recovery_register(rebuild_start=ledger_store_rebuild.delay, lease_finder=lease_from_ledger)
