"""An alert as a person reads it in a list: the limit in words, never its internal id."""

from __future__ import annotations

from alerts.models import Alert
from tests.alerts.test_selectors import FIRED, alert
from tests.fixtures import World


def test_an_alert_names_its_limit_in_words(world: World) -> None:
    assert str(alert(world, "a#1", "firing", 0)) == "100% of acme / chat: 10,000 tokens per day"
    spike = Alert(kind="refusal_spike", feature=world.chat, level=0.4, fired_at=FIRED)
    assert str(spike) == "refusal spike: acme/chat"
