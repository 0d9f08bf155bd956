"""The reservation fast path reads and writes JSON with orjson: the same answers as json and
DRF's JSON parser and renderer, including for every body orjson reads or writes otherwise."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime
from typing import Any

import pytest

from quotas.api.representations import iso
from quotas.api.views import _drf_render, _render

RESERVATIONS = "/api/v1/reservations"


def _reserve_text(world: Any, **fields: str) -> bytes:
    values = {"feature": '"chat"', "model": json.dumps(world.model.name), "input_tokens": "100"}
    values["max_output_tokens"] = "100"
    values.update(fields)
    return ("{" + ",".join(f'"{k}":{v}' for k, v in values.items()) + "}").encode()


ODD_BODIES = {
    "nan": lambda w: _reserve_text(w, max_output_tokens="NaN"),
    "infinity": lambda w: _reserve_text(w, max_output_tokens="Infinity"),
    "minus-infinity": lambda w: _reserve_text(w, input_tokens="-Infinity"),
    "int-past-64-bits": lambda w: _reserve_text(w, max_output_tokens="1" + "0" * 29),
    "negative-int-past-64-bits": lambda w: _reserve_text(w, input_tokens="-9223372036854775809"),
    "u64-max": lambda w: _reserve_text(w, input_tokens="18446744073709551615"),
    "float-past-double": lambda w: _reserve_text(w, max_output_tokens="1e400"),
    "integral-float": lambda w: _reserve_text(w, max_output_tokens="100.0"),
    "long-digits-in-a-string": lambda w: _reserve_text(w, feature='"1234567890123456789012"'),
    "lone-surrogate": lambda w: _reserve_text(w, feature='"\\ud800"'),
    "bad-utf8": lambda w: _reserve_text(w, feature='"ch\xffat"').replace(b"\xc3\xbf", b"\xff"),
    "bom": lambda w: b"\xef\xbb\xbf" + _reserve_text(w),
    "raw-control-character": lambda w: _reserve_text(w, feature='"ch\x01at"'),
    "duplicate-keys": lambda w: _reserve_text(w)[:-1] + b',"max_output_tokens":99999999999}',
    "list": lambda w: b"[1, 2]",
    "string": lambda w: b'"chat"',
    "null": lambda w: b"null",
    "trailing-garbage": lambda w: _reserve_text(w) + b" x",
    "truncated": lambda w: _reserve_text(w)[:-3],
}


@pytest.mark.parametrize("name", sorted(ODD_BODIES))
def test_an_odd_body_is_answered_as_drf_answers_it(world: Any, name: str) -> None:
    data = ODD_BODIES[name](world)
    client = world.client()
    fast = client.post(RESERVATIONS, data=data, content_type="application/json")
    # a query string sends the same request to the DRF view
    drf = client.post(RESERVATIONS + "?via=drf", data=data, content_type="application/json")

    assert fast["Content-Type"] == "application/json"
    assert fast.status_code == drf.status_code, (fast.content, drf.content)
    assert fast.status_code in (400, 404), fast.content
    assert json.loads(fast.content) == json.loads(drf.content)


def test_a_body_of_a_good_reservation_is_read_alike_with_or_without_orjson(world: Any) -> None:
    data = _reserve_text(world, metadata='{"run":"caf\\u00e9 \u2603","n":[1,2.5,-0.0]}')
    response = world.client().post(RESERVATIONS, data=data, content_type="application/json")

    assert response.status_code == 201, response.content
    assert response["Content-Type"] == "application/json"
    answer = json.loads(response.content)
    assert answer["reserved"]["cost_usd"] == pytest.approx(7.5e-05)


RENDERED = [
    {"a": 7.5e-05, "b": 1e15, "c": 1000000.0, "d": -0.0, "e": [], "f": {}, "g": True},
    {"text": "caf\u00e9 \u2028 line \u2029 para \u2603", "quote": '"\\/', "ctl": "\x00\x1f\x7f"},
    {"big": 2**70, "small": -(2**63) - 1},
    {"none": None, "nested": {"list": [1, None, "x"]}},
    {"tuple": (1, 2), "key": {"1": 1}},
    {"x": 9007199254740993, "y": 2**64 - 1, "z": 0.1 + 0.2},
]


@pytest.mark.parametrize("body", RENDERED)
def test_the_rendered_answer_reads_as_drfs(body: dict[str, Any]) -> None:
    ours, drf = _render(body), _drf_render(body)

    assert json.loads(ours) == json.loads(drf)
    assert "\u2028".encode() not in ours and "\u2029".encode() not in ours


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_an_answer_holding_nan_or_infinity_is_refused_as_drf_refuses_it(value: float) -> None:
    with pytest.raises(ValueError):
        _drf_render({"x": value})
    with pytest.raises(ValueError):
        _render({"x": value})


def test_an_answer_of_other_types_is_rendered_by_drfs_encoder() -> None:
    when = datetime(2026, 11, 28, 23, 38, 26, 983000, tzinfo=UTC)
    body = {"at": when, "name": type("Name", (str,), {})("x")}

    assert _render(body) == _drf_render(body)


def _iso_before(ms: Any) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def test_instants_are_written_as_before() -> None:
    rng = random.Random(7)
    values = [rng.randrange(0, 4_102_444_800_000) for _ in range(20_000)]
    values += [rng.randrange(0, 4_102_444_800) * 1000 for _ in range(2_000)]
    values += [0, 1, 999, 1000, 1001, 1_796_083_200_000, 4_102_444_799_999, 4_102_444_800_000]
    values += [-1, -1000, 5_000_000_000_000, 1_795_909_106_983.5, True]

    for ms in values:
        assert iso(ms) == _iso_before(ms), ms
