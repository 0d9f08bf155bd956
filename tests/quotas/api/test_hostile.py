"""Hostile input, generated: JSON bodies for every route of the API with hostile text (lone
surrogates, NUL, control characters), wrong types, deep nesting and large values. Nothing
answers 500 or anything but the API's JSON error shape, and every reservation and commit that
was accepted reaches the ledger."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ledger.models import UsageEvent
from ledger.services import usage_ingest
from tests.fixtures import World

RESERVATIONS = "/api/v1/reservations"
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

HOSTILE_CHARACTERS = ["\ud800", "\udfff", "\x00", "\x01", "\x07", "\x1b", "\x7f", "\u2028", "\t"]
hostile_text = st.one_of(
    st.text(max_size=20),
    st.builds(
        lambda head, bad, tail: head + bad + tail,
        st.text(max_size=8),
        st.sampled_from(HOSTILE_CHARACTERS),
        st.text(max_size=8),
    ),
    st.text(st.sampled_from(HOSTILE_CHARACTERS), min_size=1, max_size=4),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    hostile_text,
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(hostile_text, children, max_size=4)
    ),
    max_leaves=12,
)
# Raw JSON text nested past what validation allows, up to past the parser's stack
deep_json = st.builds(
    lambda depth, opening: opening * depth + "1" + ("]" if opening == "[" else "}") * depth,
    st.integers(min_value=1, max_value=3000),
    st.sampled_from(["[", '{"k":']),
)
anything = st.one_of(json_values, deep_json.map(lambda raw: RawJSON(raw)))


class RawJSON(str):
    """A value to be written into the body as JSON text, as it is."""


def tokens(low: int = 0) -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(min_value=low, max_value=2000), anything)


def body_of(valid: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Bodies whose fields are each sometimes present, sometimes valid, sometimes anything;
    sometimes with an unknown field."""
    optional = {name: st.one_of(strategy, anything) for name, strategy in valid.items()}
    optional[""] = st.tuples(hostile_text, anything)  # an unknown field's name and value
    return st.fixed_dictionaries({}, optional=optional).map(_unknown_field_spread)


def _unknown_field_spread(body: dict[str, Any]) -> dict[str, Any]:
    if "" in body:
        name, value = body.pop("")
        body[name] = value
    return body


def encoded(body: Any) -> str:
    """JSON text of a body; RawJSON values go in as written (json.dumps escapes surrogates)."""
    raws: dict[str, str] = {}

    def placeholder(value: Any) -> Any:
        if isinstance(value, RawJSON):
            raws[f"@raw{len(raws)}@"] = str(value)
            return f"@raw{len(raws) - 1}@"
        if isinstance(value, dict):
            return {k: placeholder(v) for k, v in value.items()}
        return value

    text = json.dumps(placeholder(body))
    for mark, raw in raws.items():
        text = text.replace(json.dumps(mark), raw)
    return text


def check(response: Any) -> dict[str, Any]:
    """No 500, JSON always, and the error shape on every refusal."""
    assert response.status_code < 500, response.content[:300]
    assert response["Content-Type"].startswith("application/json"), response.content[:300]
    body = json.loads(response.content.decode("utf-8"))
    if response.status_code >= 400:
        assert isinstance(body["error"], str) and body["error"], body
        assert isinstance(body["message"], str) and body["message"], body
        if response.status_code == 400 and "fields" in body:
            assert all(isinstance(e, str) for errs in body["fields"].values() for e in errs)
    return dict(body)


def reserve_fields(world: World) -> dict[str, st.SearchStrategy[Any]]:
    return {
        "feature": st.sampled_from(["chat", "batch"]),
        "model": st.just(world.model.name),
        "input_tokens": tokens(),
        "max_output_tokens": tokens(),
        "min_output_tokens": tokens(),
        "messages": st.lists(
            st.fixed_dictionaries({"role": hostile_text, "content": hostile_text})
        ),
        "prompt": hostile_text,
        "priority": st.sampled_from(["interactive", "batch", "standard"]),
        "ttl_seconds": st.integers(min_value=1, max_value=3600),
        "idempotency_key": hostile_text,
        "metadata": st.dictionaries(hostile_text, json_values, max_size=4),
    }


COMMIT_FIELDS = {
    "input_tokens": tokens(),
    "output_tokens": tokens(),
    "cached_input_tokens": tokens(),
    "finish_reason": hostile_text,
    "upstream_status": st.integers(min_value=100, max_value=599),
    "latency_ms": st.integers(min_value=0, max_value=100_000),
}


def mostly_valid(
    required: dict[str, st.SearchStrategy[Any]], fields: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[dict[str, Any]]:
    """A valid body with some optional fields of hostile text or any JSON."""
    hostile = {
        name: st.one_of(strategy, hostile_text)
        for name, strategy in fields.items()
        if name not in required
    }
    return st.fixed_dictionaries(required, optional=hostile)


def post(world: World, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    response = world.client().post(path, data=encoded(body), content_type="application/json")
    return response.status_code, check(response)


def held(world: World) -> str:
    body = {"feature": "chat", "model": world.model.name, "input_tokens": 1}
    status, reserved = post(world, RESERVATIONS, {**body, "max_output_tokens": 1})
    assert status == 201, reserved
    return str(reserved["id"])


def assert_in_ledger(accepted: dict[str, str]) -> None:
    """Every accepted reservation's row exists, in the state its last accepted call left."""
    usage_ingest()
    rows = dict(UsageEvent.objects.filter(rid__in=accepted).values_list("rid", "state"))
    assert rows == accepted


@pytest.mark.django_db
def test_hostile_reservations(world: World) -> None:
    accepted: dict[str, str] = {}

    fields = reserve_fields(world)
    required = {"feature": "chat", "model": world.model.name, "max_output_tokens": 10}
    optional = {name: fields[name] for name in ("priority", "idempotency_key", "metadata")}
    given_as = {name: st.just(value) for name, value in required.items()}
    bodies = st.one_of(
        body_of(fields),
        mostly_valid({**given_as, "input_tokens": st.just(5)}, optional),
        mostly_valid({**given_as, "prompt": hostile_text}, {}),
        anything,
    )

    @SETTINGS
    @given(body=bodies)
    @example(body={**required, "input_tokens": 5, "metadata": {"a\tb": ["\u00e9\n"]}})
    def run(body: Any) -> None:
        status, answer = post(world, RESERVATIONS, body)
        if status == 201:
            accepted[answer["id"]] = "held"

    run()
    assert accepted
    assert_in_ledger(accepted)


@pytest.mark.django_db
def test_hostile_commits(world: World) -> None:
    accepted: dict[str, str] = {}

    usage = {"input_tokens": st.just(5), "output_tokens": st.just(5)}
    bodies = st.one_of(body_of(COMMIT_FIELDS), mostly_valid(usage, COMMIT_FIELDS), anything)

    @SETTINGS
    @given(body=bodies)
    @example(body={"input_tokens": 5, "output_tokens": 5, "finish_reason": "stop"})
    @example(body={"input_tokens": 5, "output_tokens": 5, "finish_reason": "\ud800"})
    @example(body={"input_tokens": 5, "output_tokens": 5, "finish_reason": "a\x00"})
    def run(body: Any) -> None:
        rid = held(world)
        accepted[rid] = "held"
        if post(world, f"{RESERVATIONS}/{rid}/commit", body)[0] == 200:
            accepted[rid] = "committed"

    run()
    assert accepted
    assert_in_ledger(accepted)


@pytest.mark.django_db
@pytest.mark.parametrize("action", ["release", "extend"])
def test_hostile_releases_and_extensions(world: World, action: str) -> None:
    fields = {"ttl_seconds": st.integers(min_value=1, max_value=3600)} if action == "extend" else {}

    @SETTINGS
    @given(body=st.one_of(body_of(fields), anything))
    def run(body: Any) -> None:
        rid = held(world)
        status, _ = post(world, f"{RESERVATIONS}/{rid}/{action}", body)
        state = world.client().get(f"{RESERVATIONS}/{rid}").json()["status"]
        assert state == ("released" if status == 200 and action == "release" else "held")

    run()


@pytest.mark.django_db
@given(segment=hostile_text)
@SETTINGS
def test_hostile_ids_and_slugs_in_paths(world: World, segment: str) -> None:
    # what a client can put in a path: the text's UTF-8, percent-escaped (a lone surrogate
    # cannot be encoded, so it is escaped as Python would write it)
    escaped = quote(segment.encode("utf-8", "backslashreplace"), safe="")
    for path in (f"{RESERVATIONS}/{escaped}", f"/api/v1/features/{escaped}/usage"):
        check(world.client().get(path))
        check(world.client().post(path + "/commit", {"input_tokens": 1, "output_tokens": 1}))


@pytest.mark.django_db
@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000,
        '{"metadata":' + '{"a":' * 50_000 + "1" + "}" * 50_000 + "}",
        json.dumps({"prompt": "x" * 2_000_000, "metadata": {"k": "y" * 100_000}}),
        json.dumps({"metadata": {str(n): n for n in range(20_000)}}),
        json.dumps({"messages": [{"content": "z"}] * 20_000}),
        '"' + "\\ud800" * 100_000 + '"',
    ],
    ids=[
        "open-brackets",
        "deep-metadata",
        "long-strings",
        "wide-metadata",
        "many-messages",
        "surrogates",
    ],
)
def test_huge_bodies(world: World, text: str) -> None:
    response = world.client().post(RESERVATIONS, data=text, content_type="application/json")

    assert check(response)["error"] == "invalid_request"
