"""`alert_channels` in the config file: `quota apply` writes them, `quota export` prints them
(without signing secrets), re-applying changes nothing, and mistakes are reported at their
path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from alerts.models import Channel
from tests.control.test_configfile import apply, apply_refused, base_config, quota, totals

pytestmark = pytest.mark.django_db

SLACK = "https://hooks.slack.com/services/T000/B000/XXXX"


def with_channels(*channels: dict[str, Any]) -> dict[str, Any]:
    return {**base_config(), "alert_channels": list(channels)}


def test_channels_are_created_and_a_second_apply_changes_nothing(tmp_path: Path) -> None:
    document = with_channels(
        {"tenant": "acme", "name": "ops", "kind": "slack", "url": SLACK},
        {"tenant": "acme", "feature": "chat", "name": "pager", "kind": "webhook", "url": SLACK},
        {"tenant": "acme", "name": "finance", "kind": "email", "to": ["fin@acme.example"]},
    )
    output = apply(tmp_path, document)
    assert "created    alert channel acme/ops" in output
    channels = {c.name: c for c in Channel.objects.select_related("feature")}
    assert channels["ops"].target == SLACK
    assert channels["pager"].feature is not None and channels["pager"].feature.slug == "chat"
    assert len(channels["pager"].secret) == 64
    assert channels["finance"].target == "fin@acme.example"
    secret = channels["pager"].secret
    assert totals(apply(tmp_path, document)).startswith("0 created, 0 updated")
    assert Channel.objects.get(name="pager").secret == secret  # never rotated by a file


def test_export_prints_channels_without_secrets_and_applies_as_a_no_op(tmp_path: Path) -> None:
    apply(
        tmp_path,
        with_channels(
            {"tenant": "acme", "name": "hook", "kind": "webhook", "url": SLACK, "secret": "s3"},
            {"tenant": "globex", "name": "owners", "kind": "email"},
        ),
    )
    exported = quota("export")[0]
    assert yaml.safe_load(exported)["alert_channels"] == [
        {"tenant": "acme", "name": "hook", "kind": "webhook", "url": SLACK},
        {"tenant": "globex", "name": "owners", "kind": "email"},
    ]
    assert "s3" not in exported
    assert totals(apply(tmp_path, exported)).startswith("0 created, 0 updated")
    assert Channel.objects.get(name="hook").secret == "s3"


def test_prune_deletes_channels_the_file_no_longer_declares(tmp_path: Path) -> None:
    apply(tmp_path, with_channels({"tenant": "acme", "name": "ops", "kind": "slack", "url": SLACK}))
    output = apply(tmp_path, with_channels(), "--prune")
    assert "deleted    alert channel acme/ops" in output
    assert not Channel.objects.exists()


def test_a_new_url_enables_a_channel_a_failure_disabled(tmp_path: Path) -> None:
    entry = {"tenant": "acme", "name": "ops", "kind": "slack", "url": SLACK}
    apply(tmp_path, with_channels(entry))
    Channel.objects.update(enabled=False, disabled_reason="HTTP 404: no_service")
    apply(tmp_path, with_channels(entry))
    assert not Channel.objects.get().enabled  # the same dead URL stays off
    apply(tmp_path, with_channels({**entry, "url": SLACK + "new"}))
    assert Channel.objects.get().enabled


def test_mistakes_are_reported_at_their_path(tmp_path: Path) -> None:
    errors = apply_refused(
        tmp_path,
        with_channels(
            {"tenant": "nobody", "name": "a", "kind": "slack", "url": SLACK},
            {"tenant": "acme", "name": "b", "kind": "pager", "url": SLACK},
            {"tenant": "acme", "feature": "triage", "name": "c", "kind": "slack", "url": SLACK},
            {"tenant": "acme", "name": "d", "kind": "slack", "url": "not a url"},
            {"tenant": "acme", "name": "e", "kind": "email", "url": SLACK},
            {"tenant": "acme", "name": "f", "kind": "webhook"},
            {"tenant": "acme", "name": "g", "kind": "email", "to": ["nobody"]},
            {"tenant": "acme", "name": "d", "kind": "slack", "url": SLACK},
        ),
    )
    assert errors == [
        "alert_channels[0].tenant: no tenant 'nobody'",
        "alert_channels[1].kind: 'pager' is not one of email, slack, webhook",
        "alert_channels[2].feature: no feature 'triage' in tenant 'acme'",
        "alert_channels[3].url: 'not a url' is not an http(s) URL.",
        "alert_channels[4].url: email channels take 'to'",
        "alert_channels[5].url: missing (required)",
        "alert_channels[6].to: 'nobody' is not an e-mail address.",
        "alert_channels[7]: alert channel 'd' is declared twice (first at alert_channels[3])",
    ]


def test_export_redacts_slack_tokens_and_applying_it_keeps_the_stored_url(tmp_path: Path) -> None:
    slack = "https://hooks.slack.com/services/T0AB/B0CD/s3cr3tT0k3n"
    apply(tmp_path, with_channels({"tenant": "acme", "name": "ops", "kind": "slack", "url": slack}))

    exported = quota("export")[0]

    assert "s3cr3tT0k3n" not in exported
    assert yaml.safe_load(exported)["alert_channels"] == [
        {
            "tenant": "acme",
            "name": "ops",
            "kind": "slack",
            "url": "https://hooks.slack.com/services/REDACTED",
        }
    ]
    assert totals(apply(tmp_path, exported)).startswith("0 created, 0 updated")
    assert Channel.objects.get(name="ops").target == slack


def test_export_redacts_a_webhooks_credentials_and_applying_it_keeps_the_stored_url(
    tmp_path: Path,
) -> None:
    url = "https://bot:pa55@hooks.example/alerts/in?token=s3cr3tT0k3n&team=ops"
    channel = {"tenant": "acme", "name": "pager", "kind": "webhook", "url": url}
    apply(tmp_path, with_channels(channel))

    exported = quota("export")[0]

    assert "s3cr3tT0k3n" not in exported and "pa55" not in exported
    (entry,) = yaml.safe_load(exported)["alert_channels"]
    assert entry["url"] == "https://REDACTED@hooks.example/alerts/in?token=REDACTED&team=REDACTED"
    assert totals(apply(tmp_path, exported)).startswith("0 created, 0 updated")
    assert Channel.objects.get(name="pager").target == url


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("new", "https://hooks.slack.com/services/REDACTED"),  # nothing stored
        ("ops", "https://hooks.slack.com/services/T0AB/B0XX/REDACTED"),  # another webhook
    ],
)
def test_a_redacted_slack_url_that_stands_for_no_stored_one_is_refused(
    tmp_path: Path, name: str, url: str
) -> None:
    slack = "https://hooks.slack.com/services/T0AB/B0CD/s3cr3tT0k3n"
    apply(tmp_path, with_channels({"tenant": "acme", "name": "ops", "kind": "slack", "url": slack}))

    errors = apply_refused(
        tmp_path, with_channels({"tenant": "acme", "name": name, "kind": "slack", "url": url})
    )

    assert errors == [
        "alert_channels[0].url: a URL with REDACTED in it keeps the stored one, and this "
        "channel has no stored URL like it: give the full URL"
    ]
    assert Channel.objects.get(name="ops").target == slack
    assert not Channel.objects.filter(name="new").exists()
