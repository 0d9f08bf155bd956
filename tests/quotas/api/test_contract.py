"""The reservation API's contract (README.md), against the real Redis and database:
every row of the error table, and the shapes of the successful answers.

Authentication (401) and narrowed keys (403) are in tests/quotas/api/test_auth.py."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
from django.conf import settings
from rest_framework.renderers import JSONRenderer as DrfJSONRenderer

import quotas.api.views
import quotas.degraded
import quotas.recovery
import quotas.reservations
from ledger.models import UsageEvent
from ledger.services import usage_ingest
from quotas.api.renderers import JSONRenderer
from quotas.api.representations import iso
from quotas.engine.core import Engine
from quotas.keys import api_key_create
from quotas.models import ConfigVersion
from quotas.plan import plans
from quotas.reservations import get_engine
from quotas.store import config_version_bump, redis_client
from tests.factories import FeatureFactory, LanguageModelFactory, PoolFactory, TenantFactory
from tests.fakes.redis_server import wait_until
from tests.fixtures import DEAD_STORE

RESERVATIONS = "/api/v1/reservations"
UNKNOWN_ID = "rsv_000000000000000000000000"
NANO = 1_000_000_000
# gpt-4o-mini in the factory: $0.15 / $0.075 / $0.60 per million tokens, in nano-USD per token.
INPUT_NUSD, OUTPUT_NUSD = 150, 600


def body_of(response: Any, status: int, code: str) -> dict[str, Any]:
    """The JSON error body of a refusal, after checking its status, shape and media type."""
    content_type = response["Content-Type"]
    assert content_type.startswith("application/json"), (content_type, response.content[:200])
    body = json.loads(response.content)
    assert response.status_code == status, body
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    return body


def invalid_fields(response: Any) -> set[str]:
    body = body_of(response, 400, "invalid_request")
    assert isinstance(body.get("fields"), dict), body
    for name, errors in body["fields"].items():
        assert errors and all(isinstance(e, str) and e for e in errors), (name, errors)
    return set(body["fields"])


def post(client: Any, path: str, body: Any = None) -> Any:
    return client.post(path, {} if body is None else body, format="json")


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def limit_named(limits: list[dict[str, Any]], limit_id: int) -> dict[str, Any]:
    matches = [lim for lim in limits if lim["id"] == limit_id]
    assert len(matches) == 1, limits
    return matches[0]


def usage_of(client: Any, slug: str, limit_id: int) -> dict[str, Any]:
    response = client.get(f"/api/v1/features/{slug}/usage")
    assert response.status_code == 200, response.content
    return limit_named(response.json()["limits"], limit_id)


@pytest.fixture
def held(world: Any, reserve: Any) -> str:
    """The id of a held reservation of the world's tenant, for chat."""
    response = reserve()
    assert response.status_code == 201, response.content
    return str(response.json()["id"])


@pytest.fixture
def day_budget(world: Any) -> Any:
    """A budget that does not refill, so debits and refunds can be read exactly."""
    return world.limit(tenant=world.tenant, metric="tokens", window="day", amount=100_000)


# -- 400 invalid_request -----------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["feature", "model", "max_output_tokens"])
def test_a_reservation_missing_a_required_field_is_invalid(world: Any, missing: str) -> None:
    body = {
        "feature": "chat",
        "model": world.model.name,
        "input_tokens": 100,
        "max_output_tokens": 100,
    }
    del body[missing]

    assert missing in invalid_fields(post(world.client(), RESERVATIONS, body))


def test_an_empty_reservation_names_every_missing_field(world: Any) -> None:
    fields = invalid_fields(post(world.client(), RESERVATIONS, {}))

    assert {"feature", "model", "max_output_tokens"} <= fields


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("100", id="string"),
        pytest.param(1.5, id="float"),
        pytest.param(100.0, id="integral-float"),
        pytest.param(True, id="bool"),
        pytest.param(None, id="null"),
        pytest.param(-1, id="negative"),
        pytest.param(10_000_001, id="over-ten-million"),
    ],
)
def test_input_tokens_must_be_a_json_integer_in_range(world: Any, reserve: Any, value: Any) -> None:
    assert invalid_fields(reserve(input_tokens=value)) == {"input_tokens"}


def test_input_tokens_of_exactly_ten_million_is_accepted_by_validation(
    world: Any, reserve: Any
) -> None:
    response = reserve(input_tokens=10_000_000)

    # valid input: no limit is configured, so it is granted
    assert response.status_code == 201, response.content


@pytest.mark.parametrize("value", ["100", 1.5, True, -1, 10_000_001])
def test_max_output_tokens_must_be_a_json_integer_in_range(
    world: Any, reserve: Any, value: Any
) -> None:
    assert invalid_fields(reserve(max_output_tokens=value)) == {"max_output_tokens"}


@pytest.mark.parametrize("ttl", [0, 3601, -5, "60", 60.5])
def test_ttl_seconds_outside_one_to_3600_is_invalid(world: Any, reserve: Any, ttl: Any) -> None:
    assert invalid_fields(reserve(ttl_seconds=ttl)) == {"ttl_seconds"}


@pytest.mark.parametrize("ttl", [1, 3600])
def test_ttl_seconds_at_the_bounds_is_accepted(world: Any, reserve: Any, ttl: int) -> None:
    response = reserve(ttl_seconds=ttl)

    assert response.status_code == 201, response.content
    body = response.json()
    assert parse_time(body["expires_at"]) > datetime.now(UTC) + timedelta(seconds=ttl - 5)


@pytest.mark.parametrize(
    "inputs",
    [
        pytest.param({"input_tokens": 100, "prompt": "hello"}, id="tokens-and-prompt"),
        pytest.param(
            {"input_tokens": 100, "messages": [{"role": "user", "content": "hi"}]},
            id="tokens-and-messages",
        ),
        pytest.param(
            {"prompt": "hello", "messages": [{"role": "user", "content": "hi"}]},
            id="prompt-and-messages",
        ),
    ],
)
def test_giving_more_than_one_input_is_invalid(world: Any, inputs: dict[str, Any]) -> None:
    body = {"feature": "chat", "model": world.model.name, "max_output_tokens": 10, **inputs}

    assert "input_tokens" in invalid_fields(post(world.client(), RESERVATIONS, body))


def test_giving_no_input_at_all_is_invalid(world: Any) -> None:
    body = {"feature": "chat", "model": world.model.name, "max_output_tokens": 10}

    assert "input_tokens" in invalid_fields(post(world.client(), RESERVATIONS, body))


def test_an_unknown_field_is_invalid_and_named(world: Any, reserve: Any) -> None:
    assert invalid_fields(reserve(colour="blue")) == {"colour"}


def test_min_output_tokens_above_max_output_tokens_is_invalid(world: Any, reserve: Any) -> None:
    fields = invalid_fields(reserve(max_output_tokens=100, min_output_tokens=101))

    assert fields == {"min_output_tokens"}


def test_a_body_that_is_not_json_is_invalid(world: Any) -> None:
    response = world.client().post(
        RESERVATIONS, data="feature=chat&model=x", content_type="application/json"
    )

    body_of(response, 400, "invalid_request")


def test_a_body_that_is_truncated_json_is_invalid(world: Any) -> None:
    response = world.client().post(
        RESERVATIONS, data='{"feature": "chat", ', content_type="application/json"
    )

    body_of(response, 400, "invalid_request")


def test_a_body_that_is_a_json_list_is_invalid(world: Any) -> None:
    response = world.client().post(
        RESERVATIONS,
        data=json.dumps([{"feature": "chat", "model": world.model.name}]),
        content_type="application/json",
    )

    assert invalid_fields(response)


def test_a_body_that_is_a_json_string_is_invalid(world: Any) -> None:
    response = world.client().post(RESERVATIONS, data='"chat"', content_type="application/json")

    assert invalid_fields(response)


def test_a_body_sent_as_a_form_is_refused_as_json(world: Any) -> None:
    response = world.client().post(
        RESERVATIONS, data={"feature": "chat", "model": world.model.name}, format="multipart"
    )

    body_of(response, 400, "invalid_request")


def _reserve_text(world: Any, **fields: str) -> bytes:
    """A reservation's JSON written by hand, each field's value as given."""
    values = {"feature": '"chat"', "model": json.dumps(world.model.name), "input_tokens": "100"}
    values["max_output_tokens"] = "100"
    values.update(fields)
    return ("{" + ",".join(f'"{k}":{v}' for k, v in values.items()) + "}").encode()


HOSTILE_BODIES = {
    "nan": lambda w: _reserve_text(w, max_output_tokens="NaN"),
    "infinity": lambda w: _reserve_text(w, max_output_tokens="Infinity"),
    "minus-infinity": lambda w: _reserve_text(w, input_tokens="-Infinity"),
    "int-past-64-bits": lambda w: _reserve_text(w, max_output_tokens="1" + "0" * 29),
    "negative-int-past-64-bits": lambda w: _reserve_text(w, input_tokens="-9223372036854775809"),
    "float-past-double": lambda w: _reserve_text(w, max_output_tokens="1e400"),
    "long-digits-in-a-string": lambda w: _reserve_text(w, feature='"1234567890123456789012"'),
    "lone-surrogate": lambda w: _reserve_text(w, feature='"\\ud800"'),
    "bad-utf8": lambda w: _reserve_text(w, feature='"ch\xffat"').replace(b"\xc3\xbf", b"\xff"),
    "bom": lambda w: b"\xef\xbb\xbf" + _reserve_text(w),
    "raw-control-character": lambda w: _reserve_text(w, feature='"ch\x01at"'),
    "duplicate-keys": lambda w: _reserve_text(w)[:-1] + b',"max_output_tokens":99999999999}',
    "null": lambda w: b"null",
    "trailing-garbage": lambda w: _reserve_text(w) + b" x",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
def test_a_hostile_body_is_refused_as_json(world: Any, name: str) -> None:
    response = world.client().post(
        RESERVATIONS, data=HOSTILE_BODIES[name](world), content_type="application/json"
    )

    status = 404 if name == "long-digits-in-a-string" else 400
    body_of(response, status, "not_found" if status == 404 else "invalid_request")


def test_a_reservation_without_a_body_names_the_missing_fields(world: Any) -> None:
    assert {"feature", "model"} <= invalid_fields(world.client().post(RESERVATIONS))


def test_a_body_of_another_media_type_is_refused_as_json(world: Any) -> None:
    response = world.client().post(RESERVATIONS, data="hello", content_type="text/plain")

    body_of(response, 400, "invalid_request")


def test_a_body_in_a_charset_that_is_not_text_is_refused_as_json(world: Any) -> None:
    response = world.client().post(
        RESERVATIONS, data=_reserve_text(world), content_type="application/json; charset=bz2_codec"
    )

    body_of(response, 400, "invalid_request")


def test_a_body_past_the_upload_limit_is_a_400_that_says_so(world: Any, reserve: Any) -> None:
    response = reserve(prompt="y" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1))

    body = body_of(response, 400, "invalid_request")
    assert f"larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE:,} bytes" in body["message"]


def test_a_request_accepting_only_html_is_refused_as_json(world: Any) -> None:
    response = world.client().post(RESERVATIONS, {}, format="json", HTTP_ACCEPT="text/html")

    body_of(response, 406, "invalid_request")


def test_a_format_the_api_does_not_speak_is_not_found_as_json(world: Any, reserve: Any) -> None:
    response = world.client().post(RESERVATIONS + "?format=xml", {}, format="json")

    body_of(response, 404, "not_found")


def test_a_bad_host_under_api_is_refused_as_json(world: Any) -> None:
    response = world.client().post(RESERVATIONS, {}, format="json", HTTP_HOST="evil.example")

    body_of(response, 400, "invalid_request")


def test_an_unexpected_error_is_a_logged_json_500(
    world: Any, reserve: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(reserved: Any) -> dict[str, Any]:
        raise ValueError("cannot render")

    monkeypatch.setattr(quotas.api.views, "reserved_body", broken)

    body_of(reserve(), 500, "internal_error")
    assert "unhandled error in the API" in caplog.text


def test_a_commit_with_more_cached_than_input_tokens_is_invalid(world: Any, held: str) -> None:
    response = post(
        world.client(),
        f"{RESERVATIONS}/{held}/commit",
        {"input_tokens": 10, "cached_input_tokens": 11, "output_tokens": 5},
    )

    assert invalid_fields(response) == {"cached_input_tokens"}


@pytest.mark.parametrize("status", [700, 99, -1, "200"])
def test_a_commit_with_an_impossible_upstream_status_is_invalid(
    world: Any, held: str, status: Any
) -> None:
    response = post(
        world.client(),
        f"{RESERVATIONS}/{held}/commit",
        {"input_tokens": 10, "output_tokens": 5, "upstream_status": status},
    )

    assert invalid_fields(response) == {"upstream_status"}


def test_a_commit_missing_its_usage_is_invalid(world: Any, held: str) -> None:
    fields = invalid_fields(post(world.client(), f"{RESERVATIONS}/{held}/commit", {}))

    assert fields == {"input_tokens", "output_tokens"}


def test_an_invalid_commit_leaves_the_reservation_held(world: Any, held: str) -> None:
    client = world.client()
    post(client, f"{RESERVATIONS}/{held}/commit", {"input_tokens": "1", "output_tokens": 1})

    assert client.get(f"{RESERVATIONS}/{held}").json()["status"] == "held"


def test_an_extend_without_ttl_seconds_is_invalid(world: Any, held: str) -> None:
    assert invalid_fields(post(world.client(), f"{RESERVATIONS}/{held}/extend", {})) == {
        "ttl_seconds"
    }


@pytest.mark.parametrize("ttl", [0, 3601])
def test_an_extend_beyond_the_ttl_bounds_is_invalid(world: Any, held: str, ttl: int) -> None:
    response = post(world.client(), f"{RESERVATIONS}/{held}/extend", {"ttl_seconds": ttl})

    assert invalid_fields(response) == {"ttl_seconds"}


def test_a_release_with_a_body_field_is_invalid(world: Any, held: str) -> None:
    response = post(world.client(), f"{RESERVATIONS}/{held}/release", {"reason": "done"})

    assert invalid_fields(response) == {"reason"}


def test_a_batch_feature_may_not_raise_its_priority_to_interactive(
    world: Any, reserve: Any
) -> None:
    assert invalid_fields(reserve(feature="batch", priority="interactive")) == {"priority"}


def test_a_feature_may_lower_its_priority(world: Any, reserve: Any) -> None:
    response = reserve(feature="chat", priority="background")

    assert response.status_code == 201, response.content
    assert response.json()["priority"] == "background"


def test_an_unknown_priority_class_is_invalid(world: Any, reserve: Any) -> None:
    assert invalid_fields(reserve(priority="urgent")) == {"priority"}


def test_a_model_no_pool_of_the_feature_serves_is_invalid(world: Any, reserve: Any) -> None:
    other_model = LanguageModelFactory(name="claude-haiku")
    PoolFactory(slug="other", served_models=[other_model])
    world.batch.pools.set([world.pool])
    plans.clear()

    response = reserve(feature="batch", model="claude-haiku")

    assert invalid_fields(response) == {"model"}
    # the same model is fine for a feature that may use every pool
    assert reserve(feature="chat", model="claude-haiku").status_code == 201


# -- 404 not_found -----------------------------------------------------------------------------


def test_an_unknown_feature_is_not_found(world: Any, reserve: Any) -> None:
    body_of(reserve(feature="no-such-feature"), 404, "not_found")


def test_the_usage_of_an_unknown_feature_is_not_found(world: Any) -> None:
    body_of(world.client().get("/api/v1/features/no-such-feature/usage"), 404, "not_found")


def test_an_unknown_model_is_not_found(world: Any, reserve: Any) -> None:
    body_of(reserve(model="gpt-99"), 404, "not_found")


SETTLE_CALLS = [
    ("get", "", None),
    ("post", "/commit", {"input_tokens": 1, "output_tokens": 1}),
    ("post", "/release", {}),
    ("post", "/extend", {"ttl_seconds": 60}),
]


@pytest.mark.parametrize(
    "rid,method,suffix,body",
    [(rid, *call) for rid in (UNKNOWN_ID, "nonsense") for call in SETTLE_CALLS]
    # a degraded id has no lease, but it is signed for its tenant: a forged one is unknown
    + [("rsv_d_0000", *call) for call in SETTLE_CALLS],
)
def test_an_unknown_reservation_is_not_found(
    world: Any, rid: str, method: str, suffix: str, body: Any
) -> None:
    response = getattr(world.client(), method)(f"{RESERVATIONS}/{rid}{suffix}", body, format="json")

    body_of(response, 404, "not_found")


@pytest.fixture
def other_tenant(db: Any, world: Any) -> Any:
    """Tenant B, with its own feature and key, on the same shared pool."""
    tenant = TenantFactory(slug="globex", timezone="UTC")
    FeatureFactory(tenant=tenant, slug="secret-project", priority="standard")
    FeatureFactory(tenant=tenant, slug="chat", priority="standard")
    issued = api_key_create(tenant=tenant, name="globex")
    plans.clear()
    return world.client(issued.secret)


@pytest.mark.parametrize(
    "method,suffix,body",
    [
        ("get", "", None),
        ("post", "/commit", {"input_tokens": 1, "output_tokens": 1}),
        ("post", "/release", {}),
        ("post", "/extend", {"ttl_seconds": 3600}),
    ],
)
def test_another_tenants_reservation_is_not_found_and_left_untouched(
    world: Any, reserve: Any, other_tenant: Any, method: str, suffix: str, body: Any
) -> None:
    response = reserve(client=other_tenant, feature="secret-project")
    assert response.status_code == 201, response.content
    rid = response.json()["id"]
    before = other_tenant.get(f"{RESERVATIONS}/{rid}").json()

    refused = getattr(world.client(), method)(f"{RESERVATIONS}/{rid}{suffix}", body, format="json")

    body = body_of(refused, 404, "not_found")
    assert rid not in json.dumps(body)
    assert other_tenant.get(f"{RESERVATIONS}/{rid}").json() == before
    committed = post(
        other_tenant, f"{RESERVATIONS}/{rid}/commit", {"input_tokens": 100, "output_tokens": 7}
    )
    assert committed.status_code == 200, committed.content
    assert committed.json()["usage"]["output_tokens"] == 7


def test_another_tenants_reservation_answers_like_an_unknown_one(
    world: Any, reserve: Any, other_tenant: Any
) -> None:
    rid = reserve(client=other_tenant, feature="secret-project").json()["id"]

    theirs = world.client().get(f"{RESERVATIONS}/{rid}")
    unknown = world.client().get(f"{RESERVATIONS}/{UNKNOWN_ID}")

    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json() == unknown.json()


def test_another_tenants_feature_is_not_found(world: Any, reserve: Any, other_tenant: Any) -> None:
    body_of(reserve(feature="secret-project"), 404, "not_found")
    body_of(world.client().get("/api/v1/features/secret-project/usage"), 404, "not_found")


def test_a_feature_slug_resolves_within_the_keys_tenant(
    world: Any, reserve: Any, other_tenant: Any
) -> None:
    ours = reserve(feature="chat")
    theirs = reserve(client=other_tenant, feature="chat")

    assert ours.status_code == theirs.status_code == 201
    assert ours.json()["priority"] == "interactive"
    assert theirs.json()["priority"] == "standard"


@pytest.mark.parametrize(
    "path", ["/api/v1/nope", "/api/nothing", "/api/v2/reservations", "/api/v1/reservations/x/y/z"]
)
def test_an_unknown_route_under_api_answers_json_not_found(world: Any, path: str) -> None:
    body_of(world.client().get(path), 404, "not_found")
    body_of(world.client().post(path, {}, format="json"), 404, "not_found")


def test_an_unknown_route_under_api_answers_json_without_a_key(db: Any) -> None:
    from rest_framework.test import APIClient

    body_of(APIClient().get("/api/v1/nope"), 404, "not_found")


def test_a_wrong_method_answers_json(world: Any, held: str) -> None:
    response = world.client().get(f"{RESERVATIONS}/{held}/commit")

    body_of(response, 405, "method_not_allowed")
    body_of(world.client().put(RESERVATIONS, {}, format="json"), 405, "method_not_allowed")


# -- 409 conflict ------------------------------------------------------------------------------


def test_reusing_idempotency_key_with_another_body_is_a_conflict(
    world: Any, reserve: Any, day_budget: Any
) -> None:
    first = reserve(idempotency_key="call-1", input_tokens=100)
    assert first.status_code == 201

    second = reserve(idempotency_key="call-1", input_tokens=101)

    body_of(second, 409, "conflict")
    assert usage_of(world.client(), "chat", day_budget.id)["used"] == 200


def test_reusing_idempotency_key_with_the_same_body_replays_the_reservation(
    world: Any, reserve: Any, day_budget: Any
) -> None:
    first = reserve(idempotency_key="call-1")
    assert first.status_code == 201
    second = reserve(idempotency_key="call-1")

    assert second.status_code in (200, 201), second.content
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["status"] == "held"
    assert second.json()["expires_at"] == first.json()["expires_at"]
    usage = usage_of(world.client(), "chat", day_budget.id)
    assert usage["used"] == 200
    assert usage["remaining"] == 100_000 - 200


def test_replaying_an_idempotency_key_answers_like_the_original(world: Any, reserve: Any) -> None:
    world.limit(feature=world.chat, metric="tokens", window="minute", amount=1000)
    first = reserve(idempotency_key="call-1", max_output_tokens=2000, min_output_tokens=100)
    assert first.json()["granted"]["partial"] is True

    second = reserve(idempotency_key="call-1", max_output_tokens=2000, min_output_tokens=100)

    assert second.json()["id"] == first.json()["id"]
    assert second.json().get("granted") == first.json()["granted"]
    assert {"limits", "degraded", "expires_at", "reserved"} <= set(second.json())


def test_an_idempotency_key_is_scoped_to_its_tenant(
    world: Any, reserve: Any, other_tenant: Any
) -> None:
    ours = reserve(idempotency_key="shared-key", feature="chat")
    theirs = reserve(client=other_tenant, idempotency_key="shared-key", feature="chat")

    assert ours.status_code == theirs.status_code == 201
    assert ours.json()["id"] != theirs.json()["id"]


def test_committing_a_released_reservation_is_a_conflict(world: Any, held: str) -> None:
    client = world.client()
    assert post(client, f"{RESERVATIONS}/{held}/release").status_code == 200

    response = post(
        client, f"{RESERVATIONS}/{held}/commit", {"input_tokens": 1, "output_tokens": 1}
    )

    body_of(response, 409, "conflict")
    assert client.get(f"{RESERVATIONS}/{held}").json()["status"] == "released"


def test_committing_twice_with_other_usage_is_a_conflict(
    world: Any, day_budget: Any, held: str
) -> None:
    client = world.client()
    first = post(client, f"{RESERVATIONS}/{held}/commit", {"input_tokens": 100, "output_tokens": 5})
    assert first.status_code == 200

    second = post(
        client, f"{RESERVATIONS}/{held}/commit", {"input_tokens": 100, "output_tokens": 50}
    )

    body_of(second, 409, "conflict")
    assert client.get(f"{RESERVATIONS}/{held}").json()["usage"]["output_tokens"] == 5


def test_committing_twice_with_the_same_usage_returns_the_same_result(
    world: Any, reserve: Any, day_budget: Any
) -> None:
    client = world.client()
    rid = reserve().json()["id"]
    commit = {"input_tokens": 100, "output_tokens": 5, "finish_reason": "stop"}

    first = post(client, f"{RESERVATIONS}/{rid}/commit", commit)
    second = post(client, f"{RESERVATIONS}/{rid}/commit", commit)

    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert usage_of(client, "chat", day_budget.id)["used"] == 105


def test_releasing_a_committed_reservation_is_a_conflict(world: Any, held: str) -> None:
    client = world.client()
    post(client, f"{RESERVATIONS}/{held}/commit", {"input_tokens": 1, "output_tokens": 1})

    body_of(post(client, f"{RESERVATIONS}/{held}/release"), 409, "conflict")
    assert client.get(f"{RESERVATIONS}/{held}").json()["status"] == "committed"


def test_extending_a_committed_reservation_is_a_conflict(world: Any, held: str) -> None:
    client = world.client()
    post(client, f"{RESERVATIONS}/{held}/commit", {"input_tokens": 1, "output_tokens": 1})

    response = post(client, f"{RESERVATIONS}/{held}/extend", {"ttl_seconds": 60})

    body_of(response, 409, "conflict")


def test_extending_a_released_reservation_is_a_conflict(world: Any, held: str) -> None:
    client = world.client()
    post(client, f"{RESERVATIONS}/{held}/release")

    body_of(post(client, f"{RESERVATIONS}/{held}/extend", {"ttl_seconds": 60}), 409, "conflict")


def test_releasing_twice_returns_the_same_result_and_refunds_once(
    world: Any, day_budget: Any, held: str
) -> None:
    client = world.client()
    assert usage_of(client, "chat", day_budget.id)["used"] == 200
    first = post(client, f"{RESERVATIONS}/{held}/release")
    second = post(client, f"{RESERVATIONS}/{held}/release")

    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert usage_of(client, "chat", day_budget.id)["remaining"] == 100_000


def test_an_expired_lease_is_still_committed_and_says_it_expired(
    world: Any, reserve: Any, day_budget: Any
) -> None:
    client = world.client()
    rid = reserve(ttl_seconds=1, input_tokens=100, max_output_tokens=100).json()["id"]
    get_engine().clock_offset_ms = 5_000

    response = post(
        client, f"{RESERVATIONS}/{rid}/commit", {"input_tokens": 100, "output_tokens": 3}
    )

    assert response.status_code == 200, response.content
    assert response.json()["lease_expired"] is True
    assert response.json()["usage"]["output_tokens"] == 3
    assert usage_of(client, "chat", day_budget.id)["used"] == 103


def test_an_expired_lease_reads_as_expired(world: Any, reserve: Any) -> None:
    rid = reserve(ttl_seconds=1).json()["id"]
    get_engine().clock_offset_ms = 5_000

    response = world.client().get(f"{RESERVATIONS}/{rid}")

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "expired"


def test_releasing_an_expired_lease_is_a_conflict(world: Any, reserve: Any) -> None:
    rid = reserve(ttl_seconds=1).json()["id"]
    get_engine().clock_offset_ms = 5_000

    body_of(post(world.client(), f"{RESERVATIONS}/{rid}/release"), 409, "conflict")


def test_extending_an_expired_lease_is_a_conflict(world: Any, reserve: Any) -> None:
    rid = reserve(ttl_seconds=1).json()["id"]
    get_engine().clock_offset_ms = 5_000

    response = post(world.client(), f"{RESERVATIONS}/{rid}/extend", {"ttl_seconds": 60})

    body_of(response, 409, "conflict")


# -- 423 feature_paused ------------------------------------------------------------------------


def test_a_paused_feature_gets_no_reservation(world: Any, reserve: Any) -> None:
    world.chat.status = "paused"
    world.chat.save()
    plans.clear()

    body_of(reserve(feature="chat"), 423, "feature_paused")


def test_pausing_a_feature_is_seen_by_a_warm_plan_through_the_config_version(
    world: Any, reserve: Any, django_capture_on_commit_callbacks: Any
) -> None:
    assert reserve(feature="chat").status_code == 201  # the plan is loaded and cached

    with django_capture_on_commit_callbacks(execute=True):
        world.chat.status = "paused"
        world.chat.save()

    body_of(reserve(feature="chat"), 423, "feature_paused")
    assert reserve(feature="batch").status_code == 201


def test_a_paused_tenant_gets_no_reservation(
    world: Any, reserve: Any, django_capture_on_commit_callbacks: Any
) -> None:
    assert reserve().status_code == 201
    with django_capture_on_commit_callbacks(execute=True):
        world.tenant.status = "suspended"
        world.tenant.save()

    body_of(reserve(), 423, "feature_paused")


def test_a_paused_feature_still_settles_its_held_reservations(
    world: Any, held: str, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        world.chat.status = "paused"
        world.chat.save()

    response = post(
        world.client(), f"{RESERVATIONS}/{held}/commit", {"input_tokens": 10, "output_tokens": 3}
    )

    assert response.status_code == 200, response.content


# -- 429 rate_limited / budget_exhausted -------------------------------------------------------


def test_a_short_minute_limit_is_rate_limited_with_the_exact_retry_after(
    world: Any, reserve: Any
) -> None:
    limit = world.limit(feature=world.chat, metric="tokens", window="minute", amount=1000)
    assert reserve(input_tokens=100, max_output_tokens=700).status_code == 201

    refused = reserve(input_tokens=100, max_output_tokens=700)

    body = body_of(refused, 429, "rate_limited")
    # 800 needed, ~200 left, refilling 1000 per 60 s: 600 tokens take 36 s
    retry_after = refused["Retry-After"]
    assert retry_after.isdigit(), retry_after
    assert 30 <= int(retry_after) <= 36  # a little has refilled since
    described = body["limit"]
    assert described["id"] == limit.id
    assert described["name"] == str(limit)
    assert described["metric"] == "tokens"
    assert described["window"] == "minute"
    assert described["limit"] == 1000
    assert 200 <= described["remaining"] < 300
    assert described["scope"] == {"tenant": "acme", "feature": "chat"}
    assert refused["RateLimit-Policy"] == '"tokens-minute";q=1000;w=60'
    assert refused["RateLimit"].startswith('"tokens-minute";r=2')
    assert refused["RateLimit"].endswith(f";t={retry_after}")


def test_retrying_at_retry_after_is_admitted_and_earlier_is_not(world: Any, reserve: Any) -> None:
    world.limit(feature=world.chat, metric="tokens", window="minute", amount=1000)
    engine = get_engine()
    engine.clock_offset_ms = 0
    reserve(input_tokens=100, max_output_tokens=700)
    retry_after = int(reserve(input_tokens=100, max_output_tokens=700)["Retry-After"])

    engine.clock_offset_ms = (retry_after - 2) * 1000
    early = reserve(input_tokens=100, max_output_tokens=700)
    engine.clock_offset_ms = retry_after * 1000
    on_time = reserve(input_tokens=100, max_output_tokens=700)

    body_of(early, 429, "rate_limited")
    assert on_time.status_code == 201, on_time.content


def test_a_request_larger_than_a_limit_can_ever_admit_says_so(world: Any, reserve: Any) -> None:
    world.limit(feature=world.chat, metric="tokens", window="minute", amount=1000)

    refused = reserve(input_tokens=900, max_output_tokens=200)

    body = body_of(refused, 429, "rate_limited")
    assert body["limit"]["limit"] == 1000


def test_an_exhausted_day_budget_retries_after_the_tenants_next_midnight(
    world: Any, reserve: Any
) -> None:
    limit = world.limit(feature=world.chat, metric="tokens", window="day", amount=1000)
    assert reserve(input_tokens=100, max_output_tokens=700).status_code == 201

    refused = reserve(input_tokens=100, max_output_tokens=700)

    body = body_of(refused, 429, "budget_exhausted")
    berlin = ZoneInfo("Europe/Berlin")
    now = datetime.now(berlin)
    midnight = datetime.combine(now.date() + timedelta(days=1), clock_time(0), tzinfo=berlin)
    expected = math.ceil((midnight.astimezone(UTC) - now.astimezone(UTC)).total_seconds())
    retry_after = refused["Retry-After"]
    assert retry_after.isdigit(), retry_after
    assert abs(int(retry_after) - expected) <= 2, (retry_after, expected)
    described = body["limit"]
    assert described["id"] == limit.id
    assert described["metric"] == "tokens"
    assert described["window"] == "day"
    assert described["limit"] == 1000
    assert described["remaining"] == 200
    assert refused["RateLimit-Policy"] == '"tokens-day";q=1000;w=86400'
    assert refused["RateLimit"] == f'"tokens-day";r=200;t={retry_after}'


def test_a_cost_budget_is_exhausted_in_usd(world: Any, reserve: Any) -> None:
    # 100 input + 1000 output tokens cost 15,000 + 600,000 nano-USD = $0.000615
    world.limit(feature=world.chat, metric="cost_usd", window="month", amount="0.001")
    assert reserve(input_tokens=100, max_output_tokens=1000).status_code == 201

    refused = reserve(input_tokens=100, max_output_tokens=1000)

    body = body_of(refused, 429, "budget_exhausted")
    assert body["limit"]["metric"] == "cost_usd"
    assert body["limit"]["limit"] == pytest.approx(0.001)
    assert body["limit"]["remaining"] == pytest.approx(0.001 - 0.000615)
    assert int(refused["Retry-After"]) > 0


def test_a_refused_reservation_debits_nothing(world: Any, reserve: Any) -> None:
    day = world.limit(feature=world.chat, metric="tokens", window="day", amount=100_000)
    world.limit(feature=world.chat, metric="requests", window="minute", amount=1)
    assert reserve().status_code == 201

    body_of(reserve(), 429, "rate_limited")

    assert usage_of(world.client(), "chat", day.id)["used"] == 200


# -- 503 unavailable ---------------------------------------------------------------------------


@pytest.fixture
def empty_spool() -> Iterator[None]:
    quotas.degraded._spool.clear()
    yield
    quotas.degraded._spool.clear()


@pytest.fixture
def store_down(monkeypatch: pytest.MonkeyPatch, empty_spool: None) -> Iterator[Engine]:
    """The engine on a Redis that is not there; undo() brings the real one back."""
    dead = Engine(
        redis_client(DEAD_STORE),
        hash_tag=settings.QUOTA_HASH_TAG,
    )
    monkeypatch.setattr(quotas.reservations, "get_engine", lambda: dead)
    yield dead


def test_the_apps_client_learns_a_store_is_down_at_the_first_connection_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attempts = []
    connect = redis.connection.Connection._connect

    def counted(self: Any) -> Any:
        attempts.append(1)
        return connect(self)

    monkeypatch.setattr(redis.connection.Connection, "_connect", counted)
    with pytest.raises(redis.ConnectionError):
        redis_client(DEAD_STORE).get("x")
    assert len(attempts) == 1
    attempts.clear()
    with pytest.raises(redis.ConnectionError):  # redis-py's default policy, for contrast
        redis.Redis(port=1).get("x")
    assert len(attempts) > 1


def test_a_fail_closed_pool_refuses_while_the_store_is_down(
    world: Any, reserve: Any, store_down: Engine
) -> None:
    assert world.pool.fail_mode == "closed"

    refused = reserve()

    body_of(refused, 503, "unavailable")
    assert refused["Retry-After"].isdigit() and int(refused["Retry-After"]) >= 1
    assert "Quota-Degraded" not in refused
    assert quotas.degraded.spool_size() == 0


@pytest.mark.parametrize(
    "method,suffix,body",
    [
        ("get", "", None),
        ("post", "/commit", {"input_tokens": 1, "output_tokens": 1}),
        ("post", "/release", {}),
        ("post", "/extend", {"ttl_seconds": 60}),
    ],
)
def test_settling_while_the_store_is_down_is_unavailable(
    world: Any,
    held: str,
    monkeypatch: pytest.MonkeyPatch,
    empty_spool: None,
    method: str,
    suffix: str,
    body: Any,
) -> None:
    dead = Engine(redis_client(DEAD_STORE), hash_tag="quota")
    monkeypatch.setattr(quotas.reservations, "get_engine", lambda: dead)

    response = getattr(world.client(), method)(
        f"{RESERVATIONS}/{held}{suffix}", body, format="json"
    )

    body_of(response, 503, "unavailable")
    assert int(response["Retry-After"]) >= 1


def _events(rid: str) -> list[dict[bytes, bytes]]:
    engine = get_engine()
    return [
        fields
        for _, fields in engine.client.xrange(engine.reservation_space(rid).events)
        if fields.get(b"rid") == rid.encode()
    ]


@pytest.fixture
def open_pool(world: Any) -> None:
    """The world's pool admits (degraded) while the store is down."""
    world.pool.fail_mode = "open"
    world.pool.save()
    plans.clear()


def test_a_fail_open_pool_admits_degraded_and_flushes_its_events_once_the_store_is_back(
    world: Any, reserve: Any, monkeypatch: pytest.MonkeyPatch, store_down: Engine, open_pool: None
) -> None:

    admitted = reserve()

    assert admitted.status_code == 201, admitted.content
    body = admitted.json()
    assert body["degraded"] is True
    assert admitted["Quota-Degraded"]
    assert body["status"] == "held"
    assert body["pool"] == "shared"
    degraded_id = body["id"]
    assert _events(degraded_id) == []  # waiting in the spool
    assert quotas.degraded.spool_size() == 1

    monkeypatch.undo()  # the store is back
    assert reserve().status_code == 201

    events = _events(degraded_id)
    assert len(events) == 1, events
    assert events[0][b"degraded"] == b"1"
    assert events[0][b"type"] == b"reserved"
    assert events[0][b"feature"] == b"chat"
    assert quotas.degraded.spool_size() == 0


def test_a_degraded_grants_event_reaches_the_stream_without_another_request(
    world: Any, reserve: Any, monkeypatch: pytest.MonkeyPatch, store_down: Engine, open_pool: None
) -> None:
    """The process that admitted it may serve nothing more: a thread of its own writes the
    spool once the store answers."""
    degraded_id = reserve().json()["id"]
    time.sleep(quotas.degraded.DRAIN_SECONDS * 1.5)  # a drain tried on the dead store kept it
    assert quotas.degraded.spool_size() == 1

    monkeypatch.undo()  # the store is back; no request follows

    wait_until(lambda: _events(degraded_id) != [], seconds=10, what="the spool's drain")
    assert [e[b"type"] for e in _events(degraded_id)] == [b"reserved"]
    assert quotas.degraded.spool_size() == 0


def test_a_degraded_reservation_can_be_committed_once_the_store_is_back(
    world: Any, reserve: Any, monkeypatch: pytest.MonkeyPatch, store_down: Engine, open_pool: None
) -> None:
    degraded_id = reserve().json()["id"]
    monkeypatch.undo()

    response = post(
        world.client(),
        f"{RESERVATIONS}/{degraded_id}/commit",
        {"input_tokens": 100, "output_tokens": 10},
    )

    assert response.status_code == 200, response.content
    assert response.json()["usage"]["output_tokens"] == 10
    assert response.json()["degraded"] is True
    committed = [e for e in _events(degraded_id) if e[b"type"] == b"committed"]
    assert len(committed) == 1 and committed[0][b"output_tokens"] == b"10"
    # what it was for, from the id: the ledger can attribute and price it on its own
    names = ("tenant", "feature", "pool", "model")
    identity = {n: committed[0][n.encode()].decode() for n in names}
    assert identity == {
        "tenant": world.tenant.slug,
        "feature": "chat",
        "pool": "shared",
        "model": world.model.name,
    }


def test_a_degraded_commit_is_attributed_and_priced_without_its_reservations_event(
    world: Any, reserve: Any, monkeypatch: pytest.MonkeyPatch, store_down: Engine, open_pool: None
) -> None:
    # The reservation's event waits in the spool of the process that admitted it; the commit
    # may reach the ledger first (another worker), or alone (that process's spool was lost).
    degraded_id = reserve().json()["id"]
    quotas.degraded._spool.clear()
    monkeypatch.undo()

    committed = post(
        world.client(),
        f"{RESERVATIONS}/{degraded_id}/commit",
        {"input_tokens": 1000, "output_tokens": 100},
    )
    assert committed.status_code == 200, committed.content
    usage_ingest()

    row = UsageEvent.objects.get(rid=degraded_id)
    assert (row.state, row.degraded) == ("committed", True)
    assert (row.tenant_pk, row.feature_pk, row.pool_pk, row.model_pk) == (
        world.tenant.pk,
        world.chat.pk,
        world.pool.pk,
        world.model.pk,
    )
    assert row.cost_nusd == 1000 * 150 + 100 * 600  # $0.15 and $0.60 per Mtok


def test_a_degraded_reservation_can_be_committed_while_the_store_is_still_down(
    world: Any, reserve: Any, store_down: Engine, open_pool: None
) -> None:
    degraded_id = reserve().json()["id"]

    response = post(
        world.client(),
        f"{RESERVATIONS}/{degraded_id}/commit",
        {"input_tokens": 100, "output_tokens": 10},
    )

    assert response.status_code == 200, response.content
    assert response.json()["degraded"] is True
    assert quotas.degraded.spool_size() == 2  # the reservation and its commit


def test_a_degraded_reservation_can_be_released_while_the_store_is_still_down(
    world: Any, reserve: Any, store_down: Engine, open_pool: None
) -> None:
    degraded_id = reserve().json()["id"]

    response = post(world.client(), f"{RESERVATIONS}/{degraded_id}/release")

    assert response.status_code == 200, response.content
    assert response.json()["degraded"] is True
    assert quotas.degraded.spool_size() == 2


@pytest.mark.parametrize("rid", ["rsv_d_²-abc" + "0" * 16, "rsv_d_1.².3-abc" + "0" * 16])
def test_a_degraded_id_with_digits_that_are_not_ascii_is_not_found(world: Any, rid: str) -> None:
    usage = {"input_tokens": 1, "output_tokens": 1}
    response = post(world.client(), f"{RESERVATIONS}/{rid}/commit", usage)

    assert response.status_code == 404, response.content
    assert response.json()["error"] == "not_found"


def test_a_degraded_reservation_can_be_released(
    world: Any, reserve: Any, monkeypatch: pytest.MonkeyPatch, store_down: Engine, open_pool: None
) -> None:
    degraded_id = reserve().json()["id"]
    monkeypatch.undo()

    response = post(world.client(), f"{RESERVATIONS}/{degraded_id}/release")

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "released"
    assert [e[b"type"] for e in _events(degraded_id)] == [b"reserved", b"released"]


# -- success shapes ----------------------------------------------------------------------------


@pytest.fixture
def limits(world: Any) -> dict[str, Any]:
    return {
        "minute": world.limit(feature=world.chat, metric="tokens", window="minute", amount=10_000),
        "day": world.limit(tenant=world.tenant, metric="tokens", window="day", amount=100_000),
        "pool": world.limit(pool=world.pool, metric="requests", window="minute", amount=600),
        "batch": world.limit(feature=world.batch, metric="tokens", window="minute", amount=500),
    }


def test_a_reservation_is_created_with_its_full_shape(
    world: Any, reserve: Any, limits: dict[str, Any]
) -> None:
    started = datetime.now(UTC)

    response = reserve(input_tokens=100, max_output_tokens=100)

    assert response.status_code == 201, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["id"].startswith("rsv_")
    assert body["status"] == "held"
    assert body["feature"] == "chat"
    assert body["model"] == world.model.name
    assert body["pool"] == "shared"
    assert body["priority"] == "interactive"
    assert body["input_tokens_estimated"] is False
    assert body["degraded"] is False
    assert body["reserved"] == {
        "input_tokens": 100,
        "output_tokens": 100,
        "cost_usd": pytest.approx((100 * INPUT_NUSD + 100 * OUTPUT_NUSD) / NANO),
    }
    assert body["granted"]["output_tokens"] == 100
    expires = parse_time(body["expires_at"])
    assert started + timedelta(seconds=55) < expires < started + timedelta(seconds=65)
    by_id = {lim["id"]: lim for lim in body["limits"]}
    assert set(by_id) == {limits["minute"].id, limits["day"].id, limits["pool"].id}
    for lim in body["limits"]:
        assert {"name", "metric", "window", "limit", "remaining", "reset"} <= set(lim), lim
        assert parse_time(lim["reset"]) >= started
    minute, day, pool = (by_id[limits[k].id] for k in ("minute", "day", "pool"))
    assert (minute["metric"], minute["window"], minute["limit"]) == ("tokens", "minute", 10_000)
    assert minute["remaining"] == 9_800
    assert (day["metric"], day["window"], day["limit"], day["remaining"]) == (
        "tokens",
        "day",
        100_000,
        99_800,
    )
    assert (pool["metric"], pool["limit"], pool["remaining"]) == ("requests", 600, 599)
    assert response["RateLimit-Policy"]
    assert response["RateLimit"]


def test_a_successful_reservation_carries_ratelimit_headers_for_the_tightest_limit(
    world: Any, reserve: Any, limits: dict[str, Any]
) -> None:
    response = reserve(input_tokens=100, max_output_tokens=100)

    # tokens/minute is at 98% left, the day budget and the pool's requests at 99.8%
    assert response["RateLimit-Policy"] == '"tokens-minute";q=10000;w=60'
    assert response["RateLimit"].startswith('"tokens-minute";r=9800;t=')
    assert int(response["RateLimit"].rsplit("t=", 1)[1]) in (1, 2)


def test_the_first_pool_in_order_that_admits_is_used_and_named(world: Any, reserve: Any) -> None:
    world.pool.position = 0
    world.pool.save()
    PoolFactory(slug="overflow", served_models=[world.model], position=1)
    world.limit(pool=world.pool, metric="requests", window="minute", amount=1)

    first, second = reserve(), reserve()

    assert first.json()["pool"] == "shared"
    assert second.status_code == 201, second.content
    assert second.json()["pool"] == "overflow"


def test_the_caller_may_name_the_pool(world: Any, reserve: Any) -> None:
    world.pool.position = 0
    world.pool.save()
    PoolFactory(slug="overflow", served_models=[world.model], position=1)
    plans.clear()

    response = reserve(pool="overflow")

    assert response.status_code == 201, response.content
    assert response.json()["pool"] == "overflow"


def test_naming_a_pool_that_does_not_serve_the_model_is_invalid(world: Any, reserve: Any) -> None:
    PoolFactory(slug="empty")
    plans.clear()

    assert invalid_fields(reserve(pool="empty")) == {"pool"}
    assert invalid_fields(reserve(pool="no-such-pool")) == {"pool"}


def test_naming_a_pool_the_feature_may_not_use_is_invalid(world: Any, reserve: Any) -> None:
    PoolFactory(slug="overflow", served_models=[world.model])
    world.batch.pools.set([world.pool])
    plans.clear()

    assert invalid_fields(reserve(feature="batch", pool="overflow")) == {"pool"}


def test_a_concurrency_limit_refuses_the_call_over_it_and_frees_its_slot_on_commit(
    world: Any, reserve: Any
) -> None:
    limit = world.limit(feature=world.chat, metric="concurrent", window="", amount=1)
    rid = reserve().json()["id"]

    refused = reserve()

    body = body_of(refused, 429, "rate_limited")
    assert body["limit"]["id"] == limit.id
    assert body["limit"]["metric"] == "concurrent"
    assert int(refused["Retry-After"]) >= 1
    post(world.client(), f"{RESERVATIONS}/{rid}/commit", {"input_tokens": 1, "output_tokens": 1})
    assert reserve().status_code == 201


def test_a_smaller_grant_is_given_down_to_min_output_tokens(world: Any, reserve: Any) -> None:
    world.limit(feature=world.chat, metric="tokens", window="minute", amount=1000)

    response = reserve(input_tokens=100, max_output_tokens=2000, min_output_tokens=500)

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["granted"] == {"output_tokens": 900, "partial": True}
    assert body["reserved"]["output_tokens"] == 900


def test_committing_returns_usage_cost_and_refund_and_refunds_at_once(
    world: Any, reserve: Any, limits: dict[str, Any]
) -> None:
    client = world.client()
    rid = reserve(input_tokens=100, max_output_tokens=100).json()["id"]

    response = post(
        client,
        f"{RESERVATIONS}/{rid}/commit",
        {
            "input_tokens": 100,
            "cached_input_tokens": 40,
            "output_tokens": 20,
            "finish_reason": "stop",
            "upstream_status": 200,
            "latency_ms": 1234,
        },
    )

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["id"] == rid
    assert body["status"] == "committed"
    assert body["lease_expired"] is False
    cost = (60 * INPUT_NUSD + 40 * 75 + 20 * OUTPUT_NUSD) / NANO
    assert body["usage"] == {
        "input_tokens": 100,
        "cached_input_tokens": 40,
        "output_tokens": 20,
        "cost_usd": pytest.approx(cost),
    }
    assert body["refunded"]["input_tokens"] == 0
    assert body["refunded"]["output_tokens"] == 80
    reserved_cost = (100 * INPUT_NUSD + 100 * OUTPUT_NUSD) / NANO
    assert body["refunded"]["cost_usd"] == pytest.approx(reserved_cost - cost)
    assert body["overrun"] is False
    assert usage_of(client, "chat", limits["day"].id)["used"] == 120
    assert client.get(f"{RESERVATIONS}/{rid}").json()["status"] == "committed"


def test_a_commit_over_the_reservation_is_recorded_as_an_overrun(
    world: Any, reserve: Any, limits: dict[str, Any]
) -> None:
    client = world.client()
    rid = reserve(input_tokens=100, max_output_tokens=100).json()["id"]

    body = post(
        client, f"{RESERVATIONS}/{rid}/commit", {"input_tokens": 100, "output_tokens": 150}
    ).json()

    assert body["overrun"] is True
    assert body["refunded"]["output_tokens"] == -50
    assert usage_of(client, "chat", limits["day"].id)["used"] == 250


def test_releasing_refunds_everything(world: Any, reserve: Any, limits: dict[str, Any]) -> None:
    client = world.client()
    rid = reserve(input_tokens=100, max_output_tokens=100).json()["id"]
    assert usage_of(client, "chat", limits["day"].id)["remaining"] == 99_800

    response = post(client, f"{RESERVATIONS}/{rid}/release")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["id"] == rid
    assert body["status"] == "released"
    assert body["refunded"]["input_tokens"] == 100
    assert body["refunded"]["output_tokens"] == 100
    assert body["refunded"]["cost_usd"] == pytest.approx(
        (100 * INPUT_NUSD + 100 * OUTPUT_NUSD) / NANO
    )
    assert usage_of(client, "chat", limits["day"].id)["remaining"] == 100_000
    assert usage_of(client, "chat", limits["minute"].id)["remaining"] >= 9_999
    assert usage_of(client, "chat", limits["pool"].id)["remaining"] >= 599


def test_releasing_without_a_body_is_accepted(world: Any, held: str) -> None:
    response = world.client().post(f"{RESERVATIONS}/{held}/release")

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "released"


def test_extending_moves_expires_at_later(world: Any, reserve: Any) -> None:
    client = world.client()
    reserved = reserve(ttl_seconds=60).json()

    response = post(client, f"{RESERVATIONS}/{reserved['id']}/extend", {"ttl_seconds": 600})

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["id"] == reserved["id"]
    assert body["status"] == "held"
    assert parse_time(body["expires_at"]) - parse_time(reserved["expires_at"]) > timedelta(
        seconds=500
    )
    got = client.get(f"{RESERVATIONS}/{reserved['id']}").json()
    assert got["expires_at"] == body["expires_at"]


def test_getting_a_reservation_returns_it(world: Any, reserve: Any) -> None:
    reserved = reserve(input_tokens=123, max_output_tokens=45, metadata={"trace": "abc"}).json()

    response = world.client().get(f"{RESERVATIONS}/{reserved['id']}")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["id"] == reserved["id"]
    assert body["status"] == "held"
    assert body["feature"] == "chat"
    assert body["model"] == world.model.name
    assert body["pool"] == "shared"
    assert body["priority"] == "interactive"
    assert body["reserved"] == reserved["reserved"]
    assert body["expires_at"] == reserved["expires_at"]
    assert parse_time(body["created_at"]) < parse_time(body["expires_at"])


def test_the_usage_endpoint_lists_every_limit_on_the_feature(
    world: Any, reserve: Any, limits: dict[str, Any]
) -> None:
    engine = get_engine()
    engine.frozen_ms = engine.now_ms()  # no refill between the reservation and the read
    reserve(input_tokens=100, max_output_tokens=100)

    response = world.client().get("/api/v1/features/chat/usage")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["feature"] == "chat"
    assert body["status"] == "active"
    assert body["priority"] == "interactive"
    by_id = {lim["id"]: lim for lim in body["limits"]}
    assert set(by_id) == {limits["minute"].id, limits["day"].id, limits["pool"].id}
    for lim in body["limits"]:
        assert {"name", "metric", "window", "limit", "used", "remaining"} <= set(lim), lim
        assert lim["used"] + lim["remaining"] == lim["limit"]
    assert by_id[limits["day"].id]["used"] == 200
    assert by_id[limits["day"].id]["remaining"] == 99_800
    assert by_id[limits["pool"].id]["used"] == 1
    # the minute bucket refills 10,000 / 60 s meanwhile
    assert 150 <= by_id[limits["minute"].id]["used"] <= 200
    assert by_id[limits["day"].id]["reset_seconds"] > 0


def test_the_usage_of_an_untouched_feature_is_all_remaining(
    world: Any, limits: dict[str, Any]
) -> None:
    body = world.client().get("/api/v1/features/batch/usage").json()

    by_id = {lim["id"]: lim for lim in body["limits"]}
    assert set(by_id) == {limits["batch"].id, limits["day"].id, limits["pool"].id}
    assert all(lim["used"] == 0 for lim in body["limits"])


@pytest.mark.parametrize(
    "inputs",
    [
        pytest.param({"prompt": "Summarise the quarterly report in three bullets. " * 10}),
        pytest.param(
            {
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Summarise the quarterly report. " * 10},
                ]
            }
        ),
    ],
    ids=["prompt", "messages"],
)
def test_the_server_estimates_input_tokens_from_the_text(
    world: Any, reserve: Any, inputs: dict[str, Any]
) -> None:
    response = reserve(**inputs)

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["input_tokens_estimated"] is True
    assert body["reserved"]["input_tokens"] > 50
    got = world.client().get(f"{RESERVATIONS}/{body['id']}").json()
    assert got["input_tokens_estimated"] is True


def test_an_empty_prompt_is_estimated(world: Any, reserve: Any) -> None:
    response = reserve(prompt="")

    assert response.status_code == 201, response.content
    assert response.json()["input_tokens_estimated"] is True
    assert response.json()["reserved"]["input_tokens"] >= 0


def test_instants_are_written_as_iso_8601_utc() -> None:
    def formatted(ms: Any) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")

    rng = random.Random(7)
    values = [rng.randrange(0, 4_102_444_800_000) for _ in range(20_000)]
    values += [rng.randrange(0, 4_102_444_800) * 1000 for _ in range(2_000)]
    values += [0, 1, 999, 1000, 1001, 1_796_083_200_000, 4_102_444_799_999, 4_102_444_800_000]
    values += [-1, -1000, 5_000_000_000_000, 1_795_909_106_983.5, True]

    for ms in values:
        assert iso(ms) == formatted(ms), ms


def test_answers_are_utf_8_json_with_the_line_separators_escaped(world: Any, reserve: Any) -> None:
    metadata = {"run": "caf\u00e9 \u2028 \u2029 \u2603", "n": [1, 2.5, -0.0]}
    rid = reserve(metadata=metadata).json()["id"]

    response = world.client().get(f"{RESERVATIONS}/{rid}")

    assert response["Content-Type"] == "application/json"
    assert b"\\u2028" in response.content and b"\\u2029" in response.content
    assert "\u2603".encode() in response.content
    assert response.json()["metadata"] == metadata


def test_what_orjson_would_write_otherwise_is_rendered_as_drf_renders_it() -> None:
    body = {"at": datetime(2026, 11, 28, 23, 38, 26, 983000, tzinfo=UTC), "big": 2**70}
    drf = DrfJSONRenderer().render(body, "application/json")

    assert JSONRenderer().render(body, "application/json") == drf
    assert JSONRenderer().render({1: "x"}, "application/json") == b'{"1":"x"}'
    assert JSONRenderer().render(None, "application/json") == b""


def test_the_openapi_schema_is_public_and_lists_the_reservation_paths(db: Any) -> None:
    from rest_framework.test import APIClient

    response = APIClient().get("/api/schema/")

    assert response.status_code == 200
    text = response.content.decode()
    for path in (
        "/api/v1/reservations:",
        "/api/v1/reservations/{reservation_id}/commit:",
        "/api/v1/features/{slug}/usage:",
    ):
        assert path in text, path


def test_the_api_docs_page_is_public(db: Any) -> None:
    from rest_framework.test import APIClient

    response = APIClient().get("/api/docs/")

    assert response.status_code == 200
    assert b"/api/schema/" in response.content


def test_messages_that_are_not_objects_are_a_bad_request(world: Any, reserve: Any) -> None:
    response = reserve(messages=["hi", None])
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert "messages" in response.json()["fields"]


def test_metadata_with_a_number_past_a_double_s_range_is_invalid(world: Any) -> None:
    # JSON readers take 1e400 as infinity, which no answer or event could carry later
    data = (
        json.dumps(
            {
                "feature": "chat",
                "model": world.model.name,
                "input_tokens": 1,
                "max_output_tokens": 1,
            }
        )[:-1]
        + ', "metadata": {"score": 1e400}}'
    )
    response = world.client().post(RESERVATIONS, data=data, content_type="application/json")

    assert invalid_fields(response) == {"metadata"}
    assert response.json()["fields"]["metadata"] == ["Numbers in metadata must be finite."]


def test_the_usage_of_a_store_that_lost_its_data_is_unavailable_until_rebuilt(
    world: Any, reserve: Any, redis_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.limit(tenant=world.tenant, metric="tokens", window="day", amount=5000)
    ConfigVersion.bump()
    config_version_bump(1)
    plans.clear()
    assert reserve().status_code == 201
    started: list[int] = []
    monkeypatch.setattr(quotas.recovery._Hooks, "rebuild_start", lambda: started.append(1))
    redis_db.flushdb()  # the store lost its data: every counter reads zero

    response = world.client().get("/api/v1/features/chat/usage")

    body_of(response, 503, "unavailable")
    assert response["Retry-After"] == "2"
    assert started == [1]
