"""Middleware of the browser pages (admin), passed over by the reservation API.

The API authenticates every call with a bearer key and keeps no session: a session, a lazy
user, a message store and simple-history's request context cost each call time and change
nothing in its answer. These subclasses (so Django's and the admin's checks still find them)
run as before for every other path and hand calls under `API_PREFIX` straight on. Security,
common (ALLOWED_HOSTS), CSRF and clickjacking middleware still run for the API.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.contrib.sessions import middleware as sessions
from django.http import HttpRequest, HttpResponseBase
from simple_history import middleware as history

API_PREFIX = "/api/v1/"

GetResponse = Callable[[HttpRequest], HttpResponseBase]
Answer = HttpResponseBase | Awaitable[HttpResponseBase]  # as MiddlewareMixin's


def is_api(request: HttpRequest) -> bool:
    return request.path_info.startswith(API_PREFIX)


class SessionMiddleware(sessions.SessionMiddleware):
    def __call__(self, request: HttpRequest) -> Answer:
        if is_api(request):
            return self.get_response(request)
        return super().__call__(request)


class AuthenticationMiddleware(auth.AuthenticationMiddleware):
    def __call__(self, request: HttpRequest) -> Answer:
        if is_api(request):
            return self.get_response(request)
        return super().__call__(request)


class MessageMiddleware(messages.MessageMiddleware):
    def __call__(self, request: HttpRequest) -> Answer:
        if is_api(request):
            return self.get_response(request)
        return super().__call__(request)


def HistoryRequestMiddleware(get_response: GetResponse) -> GetResponse:
    """simple-history's middleware (the request of admin changes, for their history)."""
    with_history = history.HistoryRequestMiddleware(get_response)

    def middleware(request: HttpRequest) -> HttpResponseBase:
        if is_api(request):
            return get_response(request)
        return with_history(request)

    return middleware
