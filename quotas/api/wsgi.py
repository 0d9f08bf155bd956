"""The reservation API's hot routes, answered in front of Django's request handler.

Every LLM call makes a reserve and a commit, and Django's handler, middleware chain, URL
resolution and response object cost such a call more than the call's own work does (see
docs/benchmarks.md). `FastPath` wraps the Django WSGI application: an ordinary JSON POST
(`views.plain_post_length`) to reserve, commit, release or extend is answered here by the
very code the route's Django view runs (`views.JsonPost`), and every other request goes to
Django untouched. What Django would have done around the view is done here too:

* `request_started` is sent before the view and `request_finished` once the server has sent
  the answer (on closing it), by the handler's class, so database connections and caches
  are closed or kept as after any request;
* the host is validated against `ALLOWED_HOSTS` (a bad one goes to Django, which answers
  400); while a setting makes Django redirect or refuse some requests (`SECURE_SSL_REDIRECT`,
  `PREPEND_WWW`, `DISALLOWED_USER_AGENTS`), those routes go to Django; so does a request
  that carries a CSRF cookie (the CSRF middleware may answer it with a new one; other
  cookies, such as a load balancer's, change nothing in Django's answer);
* the headers the middleware adds to these answers (security headers, `X-Frame-Options`,
  `Content-Length`) are the ones Django's own middleware adds: found once per scheme by
  running it over a probe response;
* answers of 400 and above are logged to `django.request` as Django's handler logs them, and
  an exception that escapes the view is answered as Django's handler answers it (the API's
  JSON 500, logged).

It serves only when `MIDDLEWARE` is the list it was written against (`KNOWN_MIDDLEWARE`);
with any other list every request goes to Django, so a middleware added later is never
passed over unawares.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from http.client import responses
from typing import Any

from django.conf import settings
from django.core import signals
from django.core.exceptions import DisallowedHost
from django.core.handlers.exception import response_for_exception
from django.core.handlers.wsgi import WSGIHandler, WSGIRequest
from django.http import HttpResponse
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.security import SecurityMiddleware
from django.urls import Resolver404, get_resolver
from django.utils.log import log_response

from quotas.api.middleware import API_PREFIX
from quotas.api.views import JSON, JsonPost, plain_post_length

StartResponse = Callable[..., Any]
UNKNOWN_STATUS = "Unknown Status Code"  # Django's reason phrase for a status it does not know
Headers = list[tuple[str, str]]

# Of these, only security and clickjacking add headers to an API answer (common adds
# Content-Length; sessions, authentication, messages and history pass API calls over; CSRF
# exempts the hot routes; whitenoise serves static files only).
KNOWN_MIDDLEWARE = (
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "quotas.api.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "quotas.api.middleware.AuthenticationMiddleware",
    "quotas.api.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "quotas.api.middleware.HistoryRequestMiddleware",
)


class FastPath:
    def __init__(self, django: WSGIHandler) -> None:
        self.django = django
        self.enabled = tuple(settings.MIDDLEWARE) == KNOWN_MIDDLEWARE
        # by scheme: the headers that X-Frame-Options and security middleware add
        self._added: dict[bool, tuple[Headers, Headers]] = {}

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if not self._may_serve(environ):
            return self.django(environ, start_response)
        length = plain_post_length(environ)
        if length is None:
            return self.django(environ, start_response)
        # Django's request rewrites PATH_INFO in the environ it gets; Django gets the original
        request = WSGIRequest(environ.copy())
        route, kwargs = _route(request.path_info)
        if route is None:
            return self.django(environ, start_response)
        try:
            request.get_host()
        except DisallowedHost:
            return self.django(environ, start_response)
        secure = request.is_secure()
        if settings.SECURE_SSL_REDIRECT and not secure:
            return self.django(environ, start_response)

        handler = self.django.__class__  # the signals' sender, as Django's handler sends them
        signals.request_started.send(sender=handler, environ=environ)
        response: HttpResponse | None = None  # made only when an answer needs one
        try:
            status, data, headers = route.answer(request, length, kwargs)
            answer = [*_checked(headers), ("Content-Type", JSON), ("Allow", route.allow)]
        except Exception as exc:
            # what escapes the view is answered and logged as Django's handler would (the
            # API's JSON 500), never by the server's HTML page
            response = response_for_exception(request, exc)
            status, data, answer = response.status_code, response.content, list(response.items())
        if status >= 400:  # as Django's handler logs, once the answer is made (and once)
            response = response or HttpResponse(status=status)
            log_response(
                "%s: %s", response.reason_phrase, request.path, response=response, request=request
            )
        reason = response.reason_phrase if response else responses.get(status, UNKNOWN_STATUS)
        frame, security = self._middleware_headers(secure)
        start_response(
            f"{status} {reason}",
            [*answer, *frame, ("Content-Length", str(len(data))), *security],
        )
        return _Body(data, handler)

    def _may_serve(self, environ: dict[str, Any]) -> bool:
        """Whether Django's stack would answer a request to this path as the view does: not
        while a setting makes it redirect or refuse some requests, nor a request with a CSRF
        cookie (CSRF middleware may answer it with a new one)."""
        return (
            self.enabled
            and environ.get("PATH_INFO", "").startswith(API_PREFIX)
            and settings.CSRF_COOKIE_NAME not in environ.get("HTTP_COOKIE", "")
            and not settings.DISALLOWED_USER_AGENTS
            and not settings.PREPEND_WWW
        )

    def _middleware_headers(self, secure: bool) -> tuple[Headers, Headers]:
        """What X-Frame-Options middleware adds to an API answer, and what security
        middleware adds, in the order Django's response passes through them."""
        added = self._added.get(secure)
        if added is None:
            added = self._added[secure] = _probe(secure)
        return added


class _Body(list[bytes]):
    """The answer's body; closing it, once the server has sent it, ends the request as
    closing Django's response does (`request_finished`)."""

    def __init__(self, data: bytes, sender: type) -> None:
        super().__init__([data])
        self._sender = sender

    def close(self) -> None:
        signals.request_finished.send(sender=self._sender)


def _route(path: str) -> tuple[JsonPost | None, dict[str, Any]]:
    """The hot route a path resolves to (through the project's URLconf), with its arguments."""
    try:
        match = get_resolver().resolve(path)
    except Resolver404:
        return None, {}
    return getattr(match.func, "json_post", None), match.kwargs


def _checked(headers: dict[str, str]) -> Headers:
    """The view's headers as Django would send them: plain ASCII as they are, anything else
    through Django's own header handling (which refuses line breaks)."""
    items = list(headers.items())
    for name, value in items:
        if (
            not (isinstance(name, str) and isinstance(value, str))
            or not (name.isascii() and value.isascii())
            or "\n" in value
            or "\r" in value
        ):
            encoded = HttpResponse(headers=headers)  # raises, or encodes, as Django would
            return [(k, v) for k, v in encoded.items() if k in headers]
    return items


def _probe(secure: bool) -> tuple[Headers, Headers]:
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": API_PREFIX,
        "SERVER_NAME": "probe",
        "SERVER_PORT": "443" if secure else "80",
        "wsgi.url_scheme": "https" if secure else "http",
        "wsgi.input": io.BytesIO(),
    }
    request = WSGIRequest(environ)
    response = HttpResponse(b"", content_type=JSON)

    def added(middleware: XFrameOptionsMiddleware | SecurityMiddleware) -> Headers:
        before = set(response.headers)
        middleware.process_response(request, response)
        return [(k, v) for k, v in response.items() if k not in before]

    frame = added(XFrameOptionsMiddleware(lambda r: response))
    security = added(SecurityMiddleware(lambda r: response))
    return frame, security
