"""The OpenAPI schema: valid, typed (every answer and error a named component), only the
errors each route can give, readable operation ids; and the API driven from it by
schemathesis, in process, with a real key and real reservations: no answer >= 500, every
answer matching the schema."""

from __future__ import annotations

import re
from typing import Any

import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from django.core.management import call_command
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from quotas.plan import plans
from tests.fixtures import World

OPERATIONS = {
    ("post", "/api/v1/reservations"): "reservations_create",
    ("get", "/api/v1/reservations/{reservation_id}"): "reservation_get",
    ("post", "/api/v1/reservations/{reservation_id}/commit"): "reservation_commit",
    ("post", "/api/v1/reservations/{reservation_id}/release"): "reservation_release",
    ("post", "/api/v1/reservations/{reservation_id}/extend"): "reservation_extend",
    ("get", "/api/v1/features/{slug}/usage"): "feature_usage",
}
SETTLING = {"200", "400", "401", "404", "409", "411", "429", "503"}
STATUSES = {
    "reservations_create": {"201", "400", "401", "403", "404", "409", "411", "423", "429", "503"},
    "reservation_get": {"200", "401", "404", "429", "503"},
    "reservation_commit": SETTLING,
    "reservation_release": SETTLING,
    "reservation_extend": SETTLING,
    "feature_usage": {"200", "401", "403", "404", "429", "503"},
}


@pytest.fixture
def openapi(db: Any) -> dict[str, Any]:
    return APIClient().get("/api/schema/", HTTP_ACCEPT="application/json").json()


def operations(openapi: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        operation["operationId"]: operation
        for methods in openapi["paths"].values()
        for operation in methods.values()
    }


def test_the_schema_is_valid_openapi_and_generates_without_a_warning(tmp_path: Any) -> None:
    # --validate checks it against the OpenAPI 3 specification; --fail-on-warn fails on any
    # warning of drf-spectacular (an untyped field, two components with one name, ...)
    target = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))
    assert "operationId: reservations_create" in target.read_text()


def test_every_operation_has_a_readable_id(openapi: dict[str, Any]) -> None:
    found = {
        (method, path): operation["operationId"]
        for path, methods in openapi["paths"].items()
        for method, operation in methods.items()
    }
    assert found == OPERATIONS


def test_each_route_documents_only_the_statuses_it_can_give(openapi: dict[str, Any]) -> None:
    documented = {name: set(op["responses"]) for name, op in operations(openapi).items()}
    assert documented == STATUSES


def test_every_answer_and_every_error_is_a_named_component(openapi: dict[str, Any]) -> None:
    success = {}
    for name, operation in operations(openapi).items():
        for status, response in operation["responses"].items():
            ref = response["content"]["application/json"]["schema"]["$ref"]
            component = ref.removeprefix("#/components/schemas/")
            assert component in openapi["components"]["schemas"], (name, status)
            if status.startswith("2"):
                success[name] = component
            else:
                assert component == "Error", (name, status)
    assert success == {
        "reservations_create": "Reservation",
        "reservation_get": "ReservationDetail",
        "reservation_commit": "Settlement",
        "reservation_release": "Settlement",
        "reservation_extend": "ReservationDetail",
        "feature_usage": "FeatureUsage",
    }


def test_the_error_body_names_its_code_from_one_list(openapi: dict[str, Any]) -> None:
    schemas = openapi["components"]["schemas"]
    assert schemas["Error"]["required"] == ["error", "message"]
    assert schemas["Error"]["properties"]["error"] == {"$ref": "#/components/schemas/ErrorCode"}
    assert {"rate_limited", "budget_exhausted", "feature_paused"} <= set(
        schemas["ErrorCode"]["enum"]
    )


def test_the_reservation_status_enum_is_one_component(openapi: dict[str, Any]) -> None:
    schemas = openapi["components"]["schemas"]
    for name in ("Reservation", "ReservationDetail", "Settlement"):
        status = schemas[name]["properties"]["status"]
        assert status == {"$ref": "#/components/schemas/ReservationStatus"}, name
    assert "held" in schemas["ReservationStatus"]["enum"]


def test_answers_stay_open_to_new_fields_and_requests_are_closed(
    openapi: dict[str, Any],
) -> None:
    # a field added to an answer must not break a client generated from today's schema; a
    # request with a field the server does not know is refused
    for name, component in openapi["components"]["schemas"].items():
        closed = component.get("additionalProperties") is False
        assert closed == name.endswith("Request"), name


def test_the_docs_page_loads_nothing_from_another_site(db: Any) -> None:
    response = APIClient().get("/api/docs/")
    # and what Redoc's script would fetch from elsewhere, the browser refuses
    assert response["Content-Security-Policy"].startswith("default-src 'self';")
    page = response.content.decode()
    addresses = re.findall(r'(?:src|href|spec-url)="([^"]+)"', page)
    assert "/api/schema/" in addresses
    assert any(a.startswith("/static/drf_spectacular_sidecar/redoc/") for a in addresses)
    assert [a for a in addresses if not a.startswith("/")] == []
    assert "fonts.googleapis" not in page


# -- schemathesis --------------------------------------------------------------------------


@pytest.fixture
def reservation_ids(world: World) -> list[str]:
    """A held, a committed and a released reservation, for the routes that take an id; a
    pool limit that refuses large reservations, and a paused feature."""
    world.limit(pool=world.pool, metric="tokens", amount=5_000)
    world.batch.status = "paused"
    world.batch.save()
    plans.clear()
    client = world.client()

    def reserve() -> str:
        body = {"feature": "chat", "model": world.model.name, "input_tokens": 10}
        response = client.post("/api/v1/reservations", {**body, "max_output_tokens": 10}, "json")
        assert response.status_code == 201, response.content
        return str(response.json()["id"])

    held, committed, released = reserve(), reserve(), reserve()
    settle = "/api/v1/reservations/{}/{}"
    body = {"input_tokens": 5, "output_tokens": 5}
    assert client.post(settle.format(committed, "commit"), body, "json").status_code == 200
    assert client.post(settle.format(released, "release"), {}, "json").status_code == 200
    return [held, committed, released]


# What the app's fixtures hold, for the hooks below: filled by `real_data` before each run.
REAL: dict[str, Any] = {}
# The schema, served by the app in process (it needs no database).
schema = schemathesis.openapi.from_wsgi("/api/schema/", WSGIHandler())
SLUGS = ("chat", "batch")
NOT_KEPT = {"messages", "prompt", "pool", "metadata"}


@pytest.fixture
def real_data(world: World, reservation_ids: list[str]) -> None:
    REAL.update(ids=reservation_ids, model=world.model.name)


@schema.hook
def flatmap_path_parameters(context: Any, parameters: dict[str, Any] | None) -> Any:
    """Mostly real ids and slugs: a random one only ever meets a 404."""
    for name, real in (("reservation_id", REAL.get("ids", ())), ("slug", SLUGS)):
        if parameters and name in parameters:
            values = st.sampled_from([*real, parameters[name]])
            return values.map(lambda value, name=name: {**parameters, name: value})
    return st.just(parameters)


@schema.hook
def flatmap_case(context: Any, case: Any) -> Any:
    """Positive reservations name the tenant's features and model, and give an input."""
    positive = case.meta is not None and case.meta.generation.mode is GenerationMode.POSITIVE
    if case.path != "/api/v1/reservations" or not positive or not isinstance(case.body, dict):
        return st.just(case)

    def real(slug: str) -> Any:
        # kept to the rules the schema cannot state: min <= max, small plain metadata
        body = {key: value for key, value in case.body.items() if key not in NOT_KEPT}
        body.update(feature=slug, model=REAL.get("model", ""))
        if body.get("input_tokens") is None:
            body["input_tokens"] = 10
        if (body.get("min_output_tokens") or 0) > body["max_output_tokens"]:
            del body["min_output_tokens"]
        case.body = body
        return case

    return st.sampled_from(SLUGS).map(real)


@schema.parametrize()
@settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_matches_the_schema_and_none_is_a_server_error(
    case: Any, world: World, real_data: None
) -> None:
    # every check but positive_data_acceptance: the schema cannot say every rule of a body
    # (min_output_tokens <= max_output_tokens, metadata's size, no control characters)
    response = case.call_and_validate(
        headers={"Authorization": f"Bearer {world.secret}"},
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_headers_conformance,
            response_schema_conformance,
            negative_data_rejection,
        ],
    )
    assert response.status_code < 500
