"""The reservation API's hot routes, answered in front of Django's request handler.

Every LLM call makes a reserve and a commit, and Django's handler, middleware chain, URL
resolution and response object cost such a call more than the call's own work does (see
docs/benchmarks.md). `FastPath` wraps the Django WSGI application: an ordinary JSON POST
(`views.plain_post_length`) to reserve, commit, release or extend is answered here by the
very code the route's Django view runs (`views.JsonPost`), and every other request goes to
Django untouched. What Django would have done around the view is done here too:

* `request_started` and `request_finished` are sent, so database connections and caches are
  closed or kept as after any request;
* the host is validated against `ALLOWED_HOSTS` (a bad one goes to Django, which answers
  400); while a setting makes Django redirect or refuse some requests (`SECURE_SSL_REDIRECT`,
  `PREPEND_WWW`, `DISALLOWED_USER_AGENTS`), those routes go to Django; so does a request
  with cookies (an API client sends none; the CSRF middleware may answer a browser's with
  a new CSRF cookie);
* the headers the middleware adds to these answers (security headers, `X-Frame-Options`,
  `Content-Length`) are the ones Django's own middleware adds: found once per scheme by
  running it over a probe response;
* answers of 400 and above are logged to `django.request` as Django's handler logs them.

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
        path = environ.get("PATH_INFO", "")
        if not (self.enabled and path.startswith(API_PREFIX)):
            return self.django(environ, start_response)
        length = plain_post_length(environ)
        route, kwargs = _route(path) if length is not None else (None, {})
        if route is None or length is None:
            return self.django(environ, start_response)
        request = WSGIRequest(environ)
        try:
            request.get_host()
        except DisallowedHost:
            return self.django(environ, start_response)
        secure = request.is_secure()
        if (
            (settings.SECURE_SSL_REDIRECT and not secure)
            or settings.DISALLOWED_USER_AGENTS
            or settings.PREPEND_WWW
            or "HTTP_COOKIE" in environ  # CSRF middleware may answer a cookie with a cookie
        ):
            return self.django(environ, start_response)

        signals.request_started.send(sender=self.__class__, environ=environ)
        try:
            status, data, headers = route.answer(request, length, kwargs)
            if status >= 400:
                log_response(
                    "%s: %s",
                    responses.get(status, UNKNOWN_STATUS),
                    request.path,
                    response=HttpResponse(status=status),
                    request=request,
                )
        finally:
            signals.request_finished.send(sender=self.__class__)
        frame, security = self._middleware_headers(secure)
        start_response(
            f"{status} {responses.get(status, UNKNOWN_STATUS)}",
            [
                *_checked(headers),
                ("Content-Type", JSON),
                ("Allow", route.allow),
                *frame,
                ("Content-Length", str(len(data))),
                *security,
            ],
        )
        return [data]

    def _middleware_headers(self, secure: bool) -> tuple[Headers, Headers]:
        """What X-Frame-Options middleware adds to an API answer, and what security
        middleware adds, in the order Django's response passes through them."""
        added = self._added.get(secure)
        if added is None:
            added = self._added[secure] = _probe(secure)
        return added


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
        if not (name.isascii() and value.isascii()) or "\n" in value or "\r" in value:
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
