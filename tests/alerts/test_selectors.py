"""Where an alert goes (a feature's owner and its tenant's owners, each once), and which
alerts still say something true (the latest of each rule and subject)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from alerts.models import Alert, Channel
from alerts.selectors import latest_alerts, owner_addresses, routes_for
from tests.factories import UserFactory
from tests.fixtures import World

FIRED = datetime(2031, 5, 6, 12, 0, tzinfo=UTC)


def test_a_features_alerts_go_to_its_owner_and_its_tenants_owners_each_once(
    world: World,
) -> None:
    owner = world.chat.owner
    world.tenant.owners.add(
        UserFactory(username="ops@acme.example"),
        UserFactory(username="cto@acme.example"),
        UserFactory(username="person-upper", email=owner.email.upper()),  # the owner again
    )
    addresses = owner_addresses(tenant=world.tenant, feature=world.chat)
    assert addresses == [owner.email, "cto@acme.example", "ops@acme.example"]
    # an e-mail channel with no target means the owners: the same message, not a second one
    Channel.objects.create(tenant=world.tenant, name="owners", kind="email")
    [route] = routes_for(tenant=world.tenant, feature=world.chat)
    assert (route.kind, route.target) == ("email", ",".join(addresses))


def test_a_tenants_own_limits_go_to_its_owners_only(world: World) -> None:
    world.tenant.owners.add(UserFactory(username="ops@acme.example"))
    assert owner_addresses(tenant=world.tenant, feature=None) == ["ops@acme.example"]


def alert(world: World, key: str, state: str, minutes: int, level: float = 1.0) -> Alert:
    return Alert.objects.create(
        key=key,
        kind="threshold",
        subject=f"limit:1@{level}",
        tenant=world.tenant,
        feature=world.chat,
        state=state,
        level=level,
        fired_at=FIRED + timedelta(minutes=minutes),
        details={"limit_name": "acme / chat: 10,000 tokens per day"},
    )


def test_a_resolve_is_no_longer_shown_once_the_same_threshold_fired_again(world: World) -> None:
    alert(world, "a#1", "resolved", 0)  # boosted
    again = alert(world, "a#2", "firing", 5)  # the boost ended
    other = alert(world, "b#1", "resolved", 1, level=0.8)
    assert set(latest_alerts(Alert.objects.all())) == {again, other}
