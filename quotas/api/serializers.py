"""Strict request validation: token counts are integers, unknown fields are refused."""

from __future__ import annotations

import json
from typing import Any

from rest_framework import serializers

from tenants.models import Priority

MAX_TOKENS = 10_000_000
MAX_TTL = 3600
MAX_METADATA_BYTES = 4096


class StrictIntegerField(serializers.IntegerField):
    """An integer in JSON: no strings, floats or booleans passed off as one."""

    default_error_messages = {"strict": "Must be an integer."}

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("strict")
        return int(super().to_internal_value(data))


def tokens(**kwargs: Any) -> StrictIntegerField:
    return StrictIntegerField(min_value=0, max_value=MAX_TOKENS, **kwargs)


class StrictSerializer(serializers.Serializer):
    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, dict):
            raise serializers.ValidationError({"non_field_errors": ["Send a JSON object."]})
        unknown = sorted(set(data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return super().to_internal_value(data)


class ReserveSerializer(StrictSerializer):
    feature = serializers.SlugField(max_length=64)
    model = serializers.CharField(max_length=128)
    input_tokens = tokens(required=False)
    messages = serializers.ListField(
        child=serializers.DictField(), required=False, max_length=10_000
    )
    prompt = serializers.CharField(
        required=False, allow_blank=True, trim_whitespace=False, max_length=40_000_000
    )
    max_output_tokens = tokens()
    min_output_tokens = tokens(required=False)
    priority = serializers.ChoiceField(choices=Priority.values, required=False)
    pool = serializers.SlugField(max_length=64, required=False)
    ttl_seconds = StrictIntegerField(min_value=1, max_value=MAX_TTL, default=60)
    idempotency_key = serializers.CharField(max_length=200, required=False)
    metadata = serializers.DictField(required=False, default=dict)

    def validate_metadata(self, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value, default=str)) > MAX_METADATA_BYTES:
            raise serializers.ValidationError(
                f"Keep metadata under {MAX_METADATA_BYTES} bytes of JSON; it travels with "
                "every event of the reservation."
            )
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        given = [name for name in ("input_tokens", "messages", "prompt") if name in attrs]
        if len(given) != 1:
            raise serializers.ValidationError(
                {"input_tokens": ["Give exactly one of input_tokens, messages or prompt."]}
            )
        low = attrs.get("min_output_tokens")
        if low is not None and low > attrs["max_output_tokens"]:
            raise serializers.ValidationError(
                {"min_output_tokens": ["Must not exceed max_output_tokens."]}
            )
        return attrs


class CommitSerializer(StrictSerializer):
    input_tokens = tokens()
    output_tokens = tokens()
    cached_input_tokens = tokens(default=0)
    finish_reason = serializers.CharField(max_length=64, required=False, default="")
    upstream_status = StrictIntegerField(min_value=100, max_value=599, required=False)
    latency_ms = StrictIntegerField(min_value=0, max_value=86_400_000, required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs["cached_input_tokens"] > attrs["input_tokens"]:
            raise serializers.ValidationError(
                {
                    "cached_input_tokens": [
                        "Cached input tokens are part of input_tokens: they cannot exceed it."
                    ]
                }
            )
        return attrs


class ExtendSerializer(StrictSerializer):
    ttl_seconds = StrictIntegerField(min_value=1, max_value=MAX_TTL)


class ReleaseSerializer(StrictSerializer):
    pass
