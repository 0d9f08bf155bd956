"""What the sync and async reservations share: the grant, the usage to commit, and the rule
for what a context manager does on the way out."""

from __future__ import annotations

import logging
import time
from datetime import datetime

from ._types import Grant, Settlement, Usage

log = logging.getLogger("quotaclient")


class HeldBase:
    def __init__(self, grant: Grant, ttl_seconds: int) -> None:
        self.grant = grant
        self.ttl_seconds = ttl_seconds
        self.expires_at: datetime | None = grant.expires_at
        self.settlement: Settlement | None = None
        self._recorded: Usage | None = None
        self._started = time.monotonic()

    def __repr__(self) -> str:
        state = self.settlement.status if self.settlement else "held"
        return f"<{type(self).__name__} {self.id} {state}>"

    @property
    def id(self) -> str:
        return self.grant.id

    @property
    def input_tokens(self) -> int:
        """Input tokens reserved (estimated by the server when messages were sent)."""
        return self.grant.input_tokens

    @property
    def output_tokens(self) -> int:
        """Output tokens granted: pass this as the call's max_tokens (it is lower than asked
        when the server granted part of it)."""
        return self.grant.output_tokens

    @property
    def partial(self) -> bool:
        return self.grant.partial

    @property
    def pool(self) -> str | None:
        """The pool the server chose: use that pool's provider credentials."""
        return self.grant.pool

    @property
    def settled(self) -> bool:
        return self.settlement is not None

    @property
    def wait_ms(self) -> int:
        """How long the server scheduled the call to wait (0: it could start at once)."""
        return self.grant.wait_ms

    def started(self) -> None:
        """The call may start now (a scheduled one has waited): latency counts from here."""
        self._started = time.monotonic()

    def elapsed_ms(self) -> int:
        return int((time.monotonic() - self._started) * 1000)

    def record_usage(
        self,
        input_tokens: int,
        output_tokens: int,
        *,
        cached_input_tokens: int = 0,
        finish_reason: str = "",
        upstream_status: int | None = None,
        latency_ms: int | None = None,
    ) -> None:
        """What the call used, committed when the `with` block ends (even if it ends with an
        exception: the tokens were spent). The latency defaults to the time since the grant."""
        self._recorded = Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached_input_tokens,
            finish_reason=finish_reason,
            upstream_status=upstream_status,
            latency_ms=self.elapsed_ms() if latency_ms is None else latency_ms,
        )

    def worst_case(self, finish_reason: str = "") -> Usage:
        """Usage nobody reported is charged as reserved, as the server charges an expired
        lease: the call may have happened."""
        return Usage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            finish_reason=finish_reason,
            latency_ms=self.elapsed_ms(),
        )

    def usage_to_commit(
        self,
        input_tokens: int | None,
        output_tokens: int | None,
        cached_input_tokens: int,
        finish_reason: str,
        upstream_status: int | None,
        latency_ms: int | None,
    ) -> Usage:
        if input_tokens is None and output_tokens is None:
            if self._recorded is not None:
                return self._recorded
            log.warning("reservation %s committed without usage: charged as reserved", self.id)
            return self.worst_case(finish_reason)
        return Usage(
            input_tokens=self.input_tokens if input_tokens is None else input_tokens,
            output_tokens=self.output_tokens if output_tokens is None else output_tokens,
            cached_input_tokens=cached_input_tokens,
            finish_reason=finish_reason,
            upstream_status=upstream_status,
            latency_ms=self.elapsed_ms() if latency_ms is None else latency_ms,
        )

    def exit_action(self, failed: bool) -> str | None:
        """What leaving a `with` block does: nothing once settled; commit on success or when
        usage was recorded (the tokens were spent even if later code failed); else release."""
        if self.settled:
            return None
        if not failed or self._recorded is not None:
            return "commit"
        return "release"
