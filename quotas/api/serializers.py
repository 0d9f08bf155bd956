"""Request bodies: one declaration each, validated strictly and cheaply on the hot path.

DRF serializers build and deep-copy their fields on every request, which costs more than the
Redis round trip of a reservation. So each body is declared once as a `Body` of `Field`s,
validated by plain code, and the same declaration generates the DRF serializer that
drf-spectacular documents in the OpenAPI schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rest_framework import serializers

from quotas.engine.types import MAX_TTL, MAX_WAIT_MS
from quotas.errors import invalid
from tenants.models import Priority

MAX_TOKENS = 10_000_000
MAX_METADATA_BYTES = 4096
MAX_METADATA_DEPTH = 8
# Levels of arrays and objects within one field's value: chat messages with parts nest a few.
MAX_DEPTH = 32
SLUG = re.compile(r"^[-a-zA-Z0-9_]+\Z")
MISSING: Any = object()

Errors = dict[str, list[str]]

# What no text in a body may hold: a lone surrogate (not a character: it cannot be encoded as
# UTF-8, for Redis, the ledger or an answer) or a C0 control character other than tab, line
# feed and carriage return (PostgreSQL's text refuses NUL; the others arrive only by mistake).
# Text that is only counted and never stored (a prompt, messages) may hold control characters.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
NOT_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")


def text_problem(text: str, *, controls: bool = False) -> str | None:
    """What makes a string unfit to keep, in words, or None."""
    if not (LONE_SURROGATE if controls else NOT_TEXT).search(text):
        return None
    if LONE_SURROGATE.search(text):
        return "Must be text: it holds a lone UTF-16 surrogate."
    return "Must not hold NUL or control characters other than tab, newline and return."


def shown(text: str, limit: int = 64) -> str:
    """A caller's text as an answer may repeat it: escaped when it is not plain text, cut
    when long."""
    clipped = text if len(text) <= limit else text[:limit] + "..."
    return ascii(clipped) if NOT_TEXT.search(clipped) else clipped


def nested_problem(value: Any, *, depth: int, controls: bool) -> str | None:
    """The first problem in an array's or object's strings (keys too) and nesting, walked
    without recursion: a value nested a thousand levels must not exhaust the stack."""
    pattern = LONE_SURROGATE if controls else NOT_TEXT
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if type(item) is str:  # JSON gives exact types, tested faster than by isinstance
            if pattern.search(item):
                return text_problem(item, controls=controls)
        elif type(item) is dict or type(item) is list:
            if level > depth:
                return f"Must not nest arrays and objects more than {depth} levels deep."
            if type(item) is dict:
                stack += [(key, level) for key in item]
                item = item.values()
            stack += [(child, level + 1) for child in item]
    return None


@dataclass(frozen=True)
class Field:
    kind: type  # int, str, list or dict, as JSON gives them
    required: bool = True
    default: Any = MISSING
    low: int | None = None
    high: int | None = None
    max_length: int | None = None
    choices: tuple[str, ...] = ()
    slug: bool = False
    depth: int = MAX_DEPTH  # of a list or dict
    controls: bool = False  # text only counted, never stored, may hold control characters
    help: str = ""

    def check(self, value: Any) -> str | None:
        """The problem with a value, in words, or None."""
        if isinstance(value, bool) or not isinstance(value, self.kind):
            return f"Must be {_KIND_WORDS[self.kind]}."
        if self.kind is int and self.low is not None and value < self.low:
            return f"Must be at least {self.low}."
        if self.kind is int and self.high is not None and value > self.high:
            return f"Must be at most {self.high:,}."
        if self.max_length is not None and len(value) > self.max_length:
            return f"Must have at most {self.max_length} characters or items."
        if self.choices and value not in self.choices:
            return f"Must be one of {', '.join(self.choices)}."
        if self.slug and not SLUG.match(value):
            return "Must be a slug: letters, digits, hyphens and underscores."
        if self.kind is str:
            return text_problem(value, controls=self.controls)
        if self.kind is not int:  # a list or a dict
            return nested_problem(value, depth=self.depth, controls=self.controls)
        return None

    def as_drf(self) -> serializers.Field:
        # an optional field sent as null counts as not sent (see Body.validate)
        common: dict[str, Any] = {
            "required": self.required,
            "allow_null": not self.required,
            "help_text": self.help or None,
        }
        if self.default is not MISSING:
            common["default"] = self.default
        if self.kind is int:
            bounds = {"min_value": self.low, "max_value": self.high}
            return serializers.IntegerField(**_given(bounds), **common)
        if self.choices:
            return serializers.ChoiceField(choices=self.choices, **common)
        if self.slug:  # SLUG, in a pattern JSON Schema reads (no \Z)
            length = _given({"max_length": self.max_length})
            return serializers.RegexField(r"^[-a-zA-Z0-9_]+$", **length, **common)
        if self.kind is str:
            return serializers.CharField(**_given({"max_length": self.max_length}), **common)
        if self.kind is list:
            return serializers.ListField(child=serializers.DictField(), **common)
        return serializers.DictField(**common)


def _given(options: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in options.items() if value is not None}


_KIND_WORDS = {int: "an integer", str: "a string", list: "a list", dict: "an object"}


@dataclass(frozen=True)
class Body:
    name: str
    fields: dict[str, Field]
    rules: tuple[Callable[[dict[str, Any]], Errors], ...] = field(default=())

    def validate(self, data: Any) -> dict[str, Any]:
        """The validated body with defaults filled in, or a 400 naming every bad field."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise invalid({"non_field_errors": "Send a JSON object."})
        errors: Errors = {
            shown(name): ["Unknown field."] for name in data if name not in self.fields
        }
        clean: dict[str, Any] = {}
        for name, spec in self.fields.items():
            value = data.get(name, MISSING)
            if value is MISSING or (value is None and not spec.required):
                if spec.required:
                    errors[name] = ["This field is required."]
                elif spec.default is not MISSING:
                    clean[name] = spec.default() if callable(spec.default) else spec.default
                continue
            problem = spec.check(value)
            if problem:
                errors[name] = [problem]
            else:
                clean[name] = value
        if not errors:
            for rule in self.rules:
                errors.update(rule(clean))
        if errors:
            raise invalid(dict(sorted(errors.items())))
        return clean

    def serializer(self) -> type[serializers.Serializer]:
        """The same body as a DRF serializer, for the OpenAPI schema."""
        attrs = {name: spec.as_drf() for name, spec in self.fields.items()}
        return type(self.name, (serializers.Serializer,), attrs)


def tokens(help: str = "", **kwargs: Any) -> Field:
    return Field(int, low=0, high=MAX_TOKENS, help=help, **kwargs)


def _one_input(body: dict[str, Any]) -> Errors:
    given = [name for name in ("input_tokens", "messages", "prompt") if name in body]
    if len(given) != 1:
        return {"input_tokens": ["Give exactly one of input_tokens, messages or prompt."]}
    return {}


def _messages_are_objects(body: dict[str, Any]) -> Errors:
    if any(not isinstance(m, dict) for m in body.get("messages", ())):
        return {"messages": ['Each message must be an object, e.g. {"role": ..., "content": ...}.']}
    return {}


def _min_below_max(body: dict[str, Any]) -> Errors:
    low = body.get("min_output_tokens")
    if low is not None and low > body["max_output_tokens"]:
        return {"min_output_tokens": ["Must not exceed max_output_tokens."]}
    return {}


def _small_metadata(body: dict[str, Any]) -> Errors:
    if not body.get("metadata"):  # none, or {}: nothing to measure
        return {}
    try:  # as the usage events carry it: ASCII (a byte a character), and bounded in depth
        size = len(json.dumps(body["metadata"], separators=(",", ":"), allow_nan=False))
    except ValueError:  # a number past a double's range reads as infinity
        return {"metadata": ["Numbers in metadata must be finite."]}
    if size > MAX_METADATA_BYTES:
        return {
            "metadata": [
                f"Keep metadata under {MAX_METADATA_BYTES} bytes of JSON; it travels with "
                "every event of the reservation."
            ]
        }
    return {}


def _cached_within_input(body: dict[str, Any]) -> Errors:
    if body["cached_input_tokens"] > body["input_tokens"]:
        return {
            "cached_input_tokens": [
                "Cached input tokens are part of input_tokens: they cannot exceed it."
            ]
        }
    return {}


RESERVE = Body(
    "ReserveRequest",
    {
        "feature": Field(str, max_length=64, slug=True, help="The feature's slug."),
        "model": Field(str, max_length=128, help="The model's name."),
        "input_tokens": tokens("Input tokens; or send messages or prompt.", required=False),
        "messages": Field(
            list,
            required=False,
            max_length=10_000,
            controls=True,
            help="Chat messages; the server estimates their tokens.",
        ),
        "prompt": Field(
            str,
            required=False,
            max_length=40_000_000,
            controls=True,
            help="Prompt text; the server estimates its tokens.",
        ),
        "max_output_tokens": tokens("The most output the call may produce."),
        "min_output_tokens": tokens("Accept a partial grant down to this.", required=False),
        "priority": Field(
            str,
            required=False,
            choices=tuple(Priority.values),
            help="Lower than the feature's class, never higher.",
        ),
        "pool": Field(str, required=False, max_length=64, slug=True, help="Use this pool only."),
        "ttl_seconds": Field(int, required=False, default=60, low=1, high=MAX_TTL),
        "max_wait_ms": Field(
            int,
            required=False,
            default=0,
            low=0,
            high=MAX_WAIT_MS,
            help="Wait in line up to this long when only per-minute limits are short.",
        ),
        "idempotency_key": Field(str, required=False, max_length=200),
        "metadata": Field(dict, required=False, default=dict, depth=MAX_METADATA_DEPTH),
    },
    rules=(_one_input, _messages_are_objects, _min_below_max, _small_metadata),
)


def _upstream_status_shape(body: dict[str, Any]) -> Errors:
    status = body.get("upstream_status")
    if status is not None and 0 < status < 100:
        return {"upstream_status": ["Must be an HTTP status (100 to 599), or 0 for no answer."]}
    return {}


# What the provider answered, reported at commit and release (quotas.upstream_headers reads
# the headers; unknown or malformed ones are ignored, so any object is accepted).
UPSTREAM = {
    "upstream_status": Field(
        int,
        required=False,
        low=0,
        high=599,
        help="The provider's HTTP status; 0 for a timeout or a failed connection.",
    ),
    "latency_ms": Field(int, required=False, low=0, high=86_400_000),
    "upstream_headers": Field(
        dict,
        required=False,
        controls=True,
        depth=1_000_000,
        help="The provider's response headers as received (its rate-limit headers are read).",
    ),
}

COMMIT = Body(
    "CommitRequest",
    {
        "input_tokens": tokens("Input tokens used, cached ones included."),
        "output_tokens": tokens("Output tokens produced."),
        "cached_input_tokens": tokens(required=False, default=0),
        "finish_reason": Field(str, required=False, default="", max_length=64),
        **UPSTREAM,
    },
    rules=(_cached_within_input, _upstream_status_shape),
)

EXTEND = Body("ExtendRequest", {"ttl_seconds": Field(int, low=1, high=MAX_TTL)})
RELEASE = Body("ReleaseRequest", UPSTREAM, rules=(_upstream_status_shape,))
