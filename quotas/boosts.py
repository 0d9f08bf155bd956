"""Temporary limit boosts: a higher cap until a given time, then the amount again.

The boost lives on the limit row (so its history and the admin audit record who raised what,
when); every process's plan applies it and reloads itself when it ends.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from django.core.exceptions import ValidationError

from quotas.models import Limit

MAX_BOOST = timedelta(days=31)


def limit_boost(*, limit: Limit, amount: Decimal, until: datetime, now: datetime) -> Limit:
    """Raise `limit` to `amount` until `until`. Refuses an amount not above the limit's, a
    time in the past or more than MAX_BOOST ahead; the rest is the limit's own rules."""
    if until <= now:
        raise ValidationError({"boost_until": "The boost must end in the future."})
    if until - now > MAX_BOOST:
        days = MAX_BOOST.days
        raise ValidationError(
            {"boost_until": f"A boost lasts at most {days} days; raise the amount instead."}
        )
    if limit.amount is None:
        raise ValidationError({"boost_amount": "Only a limit with an amount can be boosted."})
    if amount <= limit.amount:
        raise ValidationError({"boost_amount": "The boosted amount must be above the amount."})
    before = limit.boost_amount, limit.boost_until
    limit.boost_amount, limit.boost_until = amount, until
    try:
        limit.full_clean()
    except ValidationError:
        limit.boost_amount, limit.boost_until = before  # the row stays as it is stored
        raise
    limit.save(update_fields=["boost_amount", "boost_until"])
    return limit


def limit_boost_end(*, limit: Limit) -> bool:
    """End a boost now. Returns whether there was one to end."""
    if limit.boost_amount is None and limit.boost_until is None:
        return False
    limit.boost_amount = None
    limit.boost_until = None
    limit.save(update_fields=["boost_amount", "boost_until"])
    return True
