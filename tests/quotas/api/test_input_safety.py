"""Text and structure a caller sends that the usage stream, the ledger, Redis or an answer
could not hold: refused as a JSON 400 naming the field, before anything is reserved or
settled; and a script's error is a logged 500, never a retryable 503."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import override_settings

import quotas.degraded
import quotas.engine.scripts
from ledger.models import UsageEvent
from ledger.services import usage_ingest
from quotas.api.serializers import MAX_METADATA_BYTES, MAX_METADATA_DEPTH
from quotas.reservations import get_engine
from tests.quotas.api.test_contract import RESERVATIONS, body_of, invalid_fields

LONE_SURROGATE, NUL, BELL, ESCAPE = "\ud800", "\x00", "\x07", "\x1b"


def send(world: Any, path: str, body: Any, **raw: str) -> Any:
    """POST a body as JSON text (json.dumps writes any string, lone surrogates included);
    each `raw` field's value is JSON text as given."""
    text = json.dumps({**body, **{name: "@" + name for name in raw}})
    for name, value in raw.items():
        text = text.replace(json.dumps("@" + name), value)
    return world.client().post(path, data=text, content_type="application/json")


def reserve_body(world: Any, **fields: Any) -> dict[str, Any]:
    return {
        "feature": "chat",
        "model": world.model.name,
        "input_tokens": 10,
        "max_output_tokens": 10,
        **fields,
    }


def nested(depth: int) -> str:
    """JSON text of `depth` levels of objects (the outermost counts as one), written out:
    json.dumps recurses, and a thousand levels are past its stack."""
    return '{"a":' * depth + "1" + "}" * depth


@pytest.fixture
def held(world: Any) -> str:
    response = send(world, RESERVATIONS, reserve_body(world))
    assert response.status_code == 201, response.content
    return str(response.json()["id"])


@pytest.mark.parametrize("bad", [LONE_SURROGATE, NUL, BELL, ESCAPE, "ok" + NUL])
@pytest.mark.parametrize(
    "fields",
    [
        lambda s: {"metadata": {"trace": s}},
        lambda s: {"metadata": {s: "key"}},
        lambda s: {"metadata": {"deep": [{"list": [s]}]}},
        lambda s: {"idempotency_key": s},
        lambda s: {"model": s},
        lambda s: {"pool": s},
        lambda s: {"feature": s},
    ],
    ids=["value", "key", "deep", "idempotency_key", "model", "pool", "feature"],
)
def test_text_no_store_could_keep_is_refused_naming_its_field(
    world: Any, bad: str, fields: Any
) -> None:
    body = fields(bad)

    response = send(world, RESERVATIONS, reserve_body(world, **body))

    assert invalid_fields(response) == set(body)
    engine = get_engine()
    assert sum(engine.client.xlen(space.events) for space in engine.spaces) == 0


@pytest.mark.parametrize("bad", [LONE_SURROGATE, NUL, BELL])
def test_a_commit_whose_finish_reason_no_store_could_keep_is_refused(
    world: Any, held: str, bad: str
) -> None:
    commit = {"input_tokens": 1, "output_tokens": 1, "finish_reason": "stop" + bad}

    response = send(world, f"{RESERVATIONS}/{held}/commit", commit)

    assert invalid_fields(response) == {"finish_reason"}
    status = world.client().get(f"{RESERVATIONS}/{held}").json()["status"]
    assert status == "held"


def test_tabs_newlines_and_any_real_character_are_kept_through_to_the_ledger(
    world: Any,
) -> None:
    text = "tab\there\nline\r\u00e9\u2028\U0001f600\x7f"
    response = send(world, RESERVATIONS, reserve_body(world, metadata={text: [text]}))
    assert response.status_code == 201, response.content
    rid = response.json()["id"]
    commit = {"input_tokens": 1, "output_tokens": 1, "finish_reason": "x\ty"}
    assert send(world, f"{RESERVATIONS}/{rid}/commit", commit).status_code == 200

    usage_ingest()

    row = UsageEvent.objects.get(rid=rid)
    assert (row.state, row.metadata, row.finish_reason) == ("committed", {text: [text]}, "x\ty")


@pytest.mark.parametrize("field", ["prompt", "messages"])
def test_text_that_is_only_counted_may_hold_control_characters(world: Any, field: str) -> None:
    text = f"{ESCAPE}[31mred{ESCAPE}[0m{NUL}"
    value = text if field == "prompt" else [{"role": "tool", "content": text}]
    body = reserve_body(world, **{field: value})
    del body["input_tokens"]

    assert send(world, RESERVATIONS, body).status_code == 201


@pytest.mark.parametrize("field", ["prompt", "messages"])
def test_counted_text_is_still_refused_with_a_lone_surrogate(world: Any, field: str) -> None:
    value = LONE_SURROGATE if field == "prompt" else [{"content": LONE_SURROGATE}]
    body = reserve_body(world, **{field: value})
    del body["input_tokens"]

    assert invalid_fields(send(world, RESERVATIONS, body)) == {field}


@pytest.mark.parametrize(
    "opening,closing,field", [("[", "]", "non_field_errors"), ('{"a":', "}", "a")]
)
def test_a_body_nested_past_the_parsers_stack_is_a_400_naming_the_field(
    world: Any, opening: str, closing: str, field: str
) -> None:
    text = opening * 1100 + "1" + closing * 1100

    response = world.client().post(RESERVATIONS, data=text, content_type="application/json")

    assert invalid_fields(response) == {field}


@pytest.mark.parametrize("depth", [MAX_METADATA_DEPTH + 1, 100, 990, 5000])
def test_metadata_nested_too_deeply_is_refused(world: Any, depth: int) -> None:
    response = send(world, RESERVATIONS, reserve_body(world), metadata=nested(depth))

    assert invalid_fields(response) == {"metadata"}


def test_metadata_at_the_depth_limit_is_accepted(world: Any) -> None:
    response = send(world, RESERVATIONS, reserve_body(world), metadata=nested(MAX_METADATA_DEPTH))

    assert response.status_code == 201, response.content


def test_messages_nested_deeply_are_refused(world: Any) -> None:
    body = reserve_body(world)
    del body["input_tokens"]

    response = send(world, RESERVATIONS, body, messages=f'[{{"content": [{nested(900)}]}}]')
    assert invalid_fields(response) == {"messages"}


def test_metadata_size_is_measured_as_the_events_carry_it(world: Any) -> None:
    # compact, non-ASCII escaped, as stored: {"k":"..."} is 8 bytes around the value
    fits = {"k": "x" * (MAX_METADATA_BYTES - 8)}
    escaped = {"k": "\u00e9" * (MAX_METADATA_BYTES // 6)}  # each is \u00e9, six bytes

    assert send(world, RESERVATIONS, reserve_body(world, metadata=fits)).status_code == 201
    too_big = send(world, RESERVATIONS, reserve_body(world, metadata=escaped))
    assert invalid_fields(too_big) == {"metadata"}


@pytest.mark.parametrize(
    "path", [RESERVATIONS, "/commit", "/release", "/extend"], ids=lambda p: p.strip("/")
)
def test_an_unknown_field_named_with_a_lone_surrogate_is_named_escaped(
    world: Any, held: str, path: str
) -> None:
    target = path if path == RESERVATIONS else f"{RESERVATIONS}/{held}{path}"

    response = send(world, target, {f"x{LONE_SURROGATE}{NUL}": 1})

    assert "'x\\ud800\\x00'" in invalid_fields(response)


def test_an_unknown_model_with_a_lone_surrogate_is_refused_not_echoed(world: Any) -> None:
    response = send(world, RESERVATIONS, reserve_body(world, model="gpt" + LONE_SURROGATE))

    assert invalid_fields(response) == {"model"}
    response.content.decode("utf-8")  # the answer is valid UTF-8


def _scripts_get_garbage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every script call sends Redis an argument its Lua cannot decode: a real script error."""
    monkeypatch.setattr(quotas.engine.scripts, "_encode", lambda payload: b"\xff not json")


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
def test_a_script_error_on_reserve_is_a_500_not_an_outage_nor_a_degraded_grant(
    world: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fail_mode: str
) -> None:
    world.pool.fail_mode = fail_mode
    world.pool.save()
    quotas.degraded._spool.clear()
    _scripts_get_garbage(monkeypatch)

    response = send(world, RESERVATIONS, reserve_body(world))

    body_of(response, 500, "internal_error")
    assert "Retry-After" not in response
    assert quotas.degraded.spool_size() == 0
    assert "ResponseError" in caplog.text


@pytest.mark.parametrize(
    "method,suffix,body",
    [
        ("get", "", None),
        ("post", "/commit", {"input_tokens": 1, "output_tokens": 1}),
        ("post", "/release", {}),
        ("post", "/extend", {"ttl_seconds": 60}),
    ],
)
def test_a_script_error_on_a_reservation_is_a_500_not_an_outage(
    world: Any, held: str, monkeypatch: pytest.MonkeyPatch, method: str, suffix: str, body: Any
) -> None:
    _scripts_get_garbage(monkeypatch)

    response = getattr(world.client(), method)(
        f"{RESERVATIONS}/{held}{suffix}", body, format="json"
    )

    body_of(response, 500, "internal_error")
    assert "Retry-After" not in response


def test_a_script_error_on_usage_is_a_500_not_an_outage(
    world: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.limit(feature=world.chat, metric="tokens", amount=1000)
    _scripts_get_garbage(monkeypatch)

    response = world.client().get("/api/v1/features/chat/usage")

    body_of(response, 500, "internal_error")


@pytest.mark.parametrize("urlconf", ["config.urls", "bench.urls"])
def test_a_bad_host_under_api_is_json_under_every_urlconf(world: Any, urlconf: str) -> None:
    with override_settings(ROOT_URLCONF=urlconf):
        response = world.client().post(RESERVATIONS, {}, format="json", HTTP_HOST="evil.example")

    body_of(response, 400, "invalid_request")
