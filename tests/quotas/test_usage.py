"""The usage endpoint's numbers as their unit means them: USD to the nano-dollar, whole
tokens and requests."""

from __future__ import annotations

from typing import Any


def test_used_is_rounded_to_what_its_unit_means(world: Any, reserve: Any) -> None:
    cost = world.limit(feature=world.chat, metric="cost_usd", window="month", amount="0.001")
    tokens = world.limit(feature=world.chat, metric="tokens", window="day", amount=100_000)
    # 100 input + 1000 output tokens cost 15,000 + 600,000 nano-USD = $0.000615
    assert reserve(input_tokens=100, max_output_tokens=1000).status_code == 201

    response = world.client().get("/api/v1/features/chat/usage")

    limits = {row["id"]: row for row in response.json()["limits"]}
    assert limits[cost.id]["used"] == 0.000615  # not 0.0006150000000000001
    assert limits[tokens.id]["used"] == 1_100 and isinstance(limits[tokens.id]["used"], int)
    assert b'"used":0.000615,' in response.content
