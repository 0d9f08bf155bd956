"""Bearer API keys, resolved from the in-process plan (no SQL per request)."""

from __future__ import annotations

import hmac
import logging
from typing import Any

import redis
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError
from django.http import HttpRequest
from django_ratelimit.core import is_ratelimited
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from quotas.engine import KeyHolder
from quotas.errors import QuotaError
from quotas.keys import api_key_hash, api_key_split, lease_digest
from quotas.plan import KeyInfo, plans

log = logging.getLogger(__name__)
FAILED_AUTH_RATE = "30/m"


class ApiPrincipal:
    """What DRF calls the user: the API key, with the tenant it belongs to; or, when the plan
    cannot be loaded and the call settles a reservation, only the presented key's digest."""

    is_authenticated = True

    def __init__(self, key: KeyInfo | KeyHolder) -> None:
        self.key = key


def authenticate(request: HttpRequest, *, settling: bool = False) -> ApiPrincipal:
    """The principal of a request's bearer key, or a QuotaError (401, or 429 when this address
    failed too often). When the plan cannot be loaded (the database is down), a call
    `settling` a reservation goes on as the holder of whatever key it presents: the engine
    lets it act only on the reservations whose lease recorded that key's digest."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        _fail(request, "Send the API key as 'Authorization: Bearer <key>'.")
    secret = secret.strip()
    prefix = api_key_split(secret)
    presented = api_key_hash(secret, pepper=settings.QUOTA_API_KEY_PEPPER)
    try:
        key = _key(prefix) if prefix else None
    except DatabaseError as exc:
        if not settling:
            raise
        log.warning("plan unavailable, settling by the key's digest: %s", exc)
        return ApiPrincipal(KeyHolder(lease_digest(presented)))
    expected = key.hashed_secret if key else "0" * 64
    if key is None or not hmac.compare_digest(expected, presented):
        _fail(request, "Unknown API key.")
    assert key is not None
    if key.revoked:  # said only to the holder of the secret: prefixes leak nothing
        _fail(request, "This API key was revoked.")
    return ApiPrincipal(key)


def _key(prefix: str) -> KeyInfo | None:
    """The key by its prefix; one this process's plan does not know yet (made a moment ago)
    is looked up again in the plan as the database holds it now."""
    key = plans.get().keys.get(prefix)
    return key if key is not None else plans.fresh().keys.get(prefix)


class ApiKeyAuthentication(BaseAuthentication):
    """Every API view's authentication: the request's bearer key."""

    def authenticate(self, request: Request) -> tuple[ApiPrincipal, None]:
        return authenticate(request._request), None

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'


class SettlingAuthentication(ApiKeyAuthentication):
    """The views that settle or read a reservation: the bearer key, or, while the plan cannot
    be loaded, its digest (the reservation's lease says whether it may act on it)."""

    def authenticate(self, request: Request) -> tuple[ApiPrincipal, None]:
        return authenticate(request._request, settling=True), None


def _fail(request: HttpRequest, message: str) -> Any:
    # Only failures count, so a client with a valid key never pays for the throttle.
    try:
        limited = is_ratelimited(
            request,
            group="api-auth-failures",
            key="ip",
            rate=FAILED_AUTH_RATE,
            increment=True,
        )
    except redis.RedisError:
        limited = False  # the throttle's store is down: still answer 401, never a 500
    except ImproperlyConfigured:
        # the request lacks the address header RATELIMIT_IP_META_KEY names (a proxy that did
        # not set it): nothing to count by, and still a 401, never a 500
        log.warning("no client address in %s to throttle by", settings.RATELIMIT_IP_META_KEY)
        limited = False
    if limited:
        raise QuotaError(
            "rate_limited",
            "Too many failed authentication attempts from this address; wait a minute.",
            headers={"Retry-After": "60"},
        )
    raise QuotaError("unauthenticated", message, headers={"WWW-Authenticate": 'Bearer realm="api"'})


class ApiKeyScheme(OpenApiAuthenticationExtension):
    """How the OpenAPI schema describes the API keys."""

    target_class = ApiKeyAuthentication
    match_subclasses = True
    name = "apiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key of the tenant: `Authorization: Bearer qk_...`.",
        }


class SettlingKeyScheme(ApiKeyScheme):
    """The settling routes take the same bearer key: they refer to the scheme ApiKeyScheme
    registers rather than register it again for their own class."""

    target_class = SettlingAuthentication
    priority = 1
    name: list[str] = []  # type: ignore[assignment]  # no component of its own

    def get_security_requirement(self, auto_schema: Any) -> dict[str, list[Any]]:
        return {ApiKeyScheme.name: []}

    def get_security_definition(self, auto_schema: Any) -> list[dict[str, str]]:  # type: ignore[override]
        return []
