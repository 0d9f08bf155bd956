"""Alert services that need no database."""

from __future__ import annotations

import pytest

from alerts.services import channel_target_redacted

SLACK = "https://hooks.slack.com/services/T0AB/B0CD/s3cr3tT0k3n"


@pytest.mark.parametrize(
    "stored",
    [
        SLACK,
        SLACK + "/",
        SLACK + "?channel=ops",
        SLACK + "/?a=b/c#frag",
        "https://user:s3cr3tT0k3n@hooks.slack.com/services/T0AB/B0CD/s3cr3tT0k3n",
    ],
)
def test_a_slack_url_loses_everything_after_services(stored: str) -> None:
    assert channel_target_redacted("slack", stored) == "https://hooks.slack.com/services/REDACTED"


def test_a_slack_url_of_another_shape_loses_its_whole_path() -> None:
    redacted = channel_target_redacted("slack", "https://chat.example/hook/s3cr3tT0k3n/?k=s3cr3t")

    assert redacted == "https://chat.example/REDACTED"


def test_a_webhook_url_keeps_its_path_and_loses_its_credentials() -> None:
    assert channel_target_redacted("webhook", SLACK + "/") == SLACK + "/"
    assert (
        channel_target_redacted("webhook", "https://u:p@hook.example/x?key=k1&key=k2#f")
        == "https://REDACTED@hook.example/x?key=REDACTED&key=REDACTED"
    )


def test_an_email_target_is_shown_as_it_is() -> None:
    to = "a@b.example, c@d.example"
    assert channel_target_redacted("email", to) == to
