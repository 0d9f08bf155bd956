"""How a message leaves the building: one Transport per channel kind (Healthchecks style).

A transport is built for one target (addresses or a URL) and `notify()`s one rendered
`Message`, retrying transient failures a bounded number of times with exponential backoff.
Failures raise `TransportError`, which says whether the target is gone for good (a Slack
hook that was removed, a webhook answering 410): the caller then disables the channel. The
registry (`TRANSPORTS`) maps a channel kind to its class and supplies the admin's choices.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import smtplib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
from django.core.exceptions import ValidationError
from django.core.mail import EmailMultiAlternatives
from django.core.validators import URLValidator, validate_email
from tenacity import RetryError, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from alerts.destinations import DestinationRefused, destination_check

SIGNATURE_HEADER = "X-Quota-Signature"


@dataclass(frozen=True)
class Message:
    """One rendered message in every shape a transport may need."""

    subject: str
    text: str
    html: str
    slack: dict[str, Any]
    data: dict[str, Any]  # the JSON body of a webhook


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    backoff_seconds: float = 0.5  # doubled per attempt: 0.5 s, 1 s, ...
    max_wait_seconds: float = 8.0
    timeout_seconds: float = 10.0


DEFAULT_RETRY = RetryPolicy()


class TransportError(Exception):
    """A failed delivery. `permanent`: the target is gone and retrying later cannot help;
    `retryable`: this attempt may succeed if repeated now (a 5xx, a timeout)."""

    def __init__(self, message: str, *, permanent: bool = False, retryable: bool = False):
        super().__init__(message)
        self.permanent = permanent
        self.retryable = retryable and not permanent
        self.attempts = 1


@dataclass
class Transport:
    kind: ClassVar[str]
    label: ClassVar[str]

    target: str
    secret: str = ""
    retry: RetryPolicy = field(default_factory=lambda: DEFAULT_RETRY)
    sleep: Callable[[float], None] = time.sleep

    @classmethod
    def validate_target(cls, target: str) -> None:
        """Raises ValidationError({"target": ...}) when the target cannot work."""

    def notify(self, message: Message) -> int:
        """Sends `message`; returns how many attempts it took, or raises TransportError."""
        retrying = Retrying(
            stop=stop_after_attempt(self.retry.attempts),
            wait=wait_exponential(
                multiplier=self.retry.backoff_seconds, max=self.retry.max_wait_seconds
            ),
            retry=retry_if_exception(lambda e: isinstance(e, TransportError) and e.retryable),
            sleep=self.sleep,
            reraise=True,
        )
        try:
            retrying(self.send_once, message)
        except TransportError as error:
            error.attempts = retrying.statistics.get("attempt_number", 1)
            raise
        except RetryError as error:  # pragma: no cover - reraise=True re-raises the cause
            raise TransportError(str(error)) from error
        attempts: int = retrying.statistics.get("attempt_number", 1)
        return attempts

    def send_once(self, message: Message) -> None:
        raise NotImplementedError


class EmailTransport(Transport):
    kind = "email"
    label = "e-mail"

    @classmethod
    def validate_target(cls, target: str) -> None:
        for address in email_addresses(target):
            try:
                validate_email(address)
            except ValidationError:
                raise ValidationError(
                    {"target": f"'{address}' is not an e-mail address."}
                ) from None

    def send_once(self, message: Message) -> None:
        email = EmailMultiAlternatives(
            message.subject, message.text, to=email_addresses(self.target)
        )
        email.attach_alternative(message.html, "text/html")
        try:
            email.send(fail_silently=False)
        except smtplib.SMTPRecipientsRefused as error:
            codes = [code for code, _ in error.recipients.values()]
            raise TransportError(
                f"recipients refused: {error.recipients}", permanent=all(c >= 500 for c in codes)
            ) from error
        except (smtplib.SMTPException, OSError) as error:
            raise TransportError(f"SMTP: {error}", retryable=True) from error


class HttpTransport(Transport):
    """POSTs JSON. 5xx, 408, 429 and network errors are retried; `gone` says which answers
    mean the target no longer exists."""

    content_type: ClassVar[str] = "application/json"

    @classmethod
    def validate_target(cls, target: str) -> None:
        try:
            URLValidator(schemes=["http", "https"])(target)
        except ValidationError:
            raise ValidationError({"target": f"'{target}' is not an http(s) URL."}) from None
        try:
            destination_check(target, resolve=False)
        except DestinationRefused as refused:
            raise ValidationError({"target": str(refused)}) from None

    def body(self, message: Message) -> bytes:
        raise NotImplementedError

    def headers(self, body: bytes) -> dict[str, str]:
        return {"Content-Type": self.content_type}

    def gone(self, response: httpx.Response) -> bool:
        return response.status_code == 410

    def send_once(self, message: Message) -> None:
        try:
            destination_check(self.target, resolve=True)
        except DestinationRefused as refused:
            raise TransportError(str(refused), permanent=True) from None
        body = self.body(message)
        try:
            response = httpx.post(
                self.target,
                content=body,
                headers=self.headers(body),
                timeout=self.retry.timeout_seconds,
            )
        except httpx.HTTPError as error:
            raise TransportError(f"{type(error).__name__}: {error}", retryable=True) from error
        if response.is_success:
            return
        detail = f"HTTP {response.status_code}: {response.text[:200]}"
        if self.gone(response):
            raise TransportError(detail, permanent=True)
        transient = response.status_code >= 500 or response.status_code in (408, 429)
        raise TransportError(detail, retryable=transient)


class SlackTransport(HttpTransport):
    kind = "slack"
    label = "Slack incoming webhook"

    # What Slack answers when an incoming webhook cannot work again until someone acts.
    GONE_ANSWERS: ClassVar[frozenset[str]] = frozenset(
        {
            "no_service",
            "no_service_id",
            "no_team",
            "team_disabled",
            "channel_is_archived",
            "channel_not_found",
            "invalid_token",
            "action_prohibited",
        }
    )

    def body(self, message: Message) -> bytes:
        return json.dumps(message.slack).encode()

    def gone(self, response: httpx.Response) -> bool:
        return response.status_code in (404, 410) or response.text.strip() in self.GONE_ANSWERS


class WebhookTransport(HttpTransport):
    """A JSON POST signed with HMAC-SHA256 over `<timestamp>.<body>`, in the header
    `X-Quota-Signature: t=<unix seconds>,v1=<hex digest>` (replays are refused by receivers
    that check the timestamp; see `webhook_signature_verify`)."""

    kind = "webhook"
    label = "JSON webhook (signed)"
    clock: Callable[[], float] = time.time

    def body(self, message: Message) -> bytes:
        return json.dumps(message.data, separators=(",", ":")).encode()

    def headers(self, body: bytes) -> dict[str, str]:
        timestamp = int(self.clock())
        return {
            **super().headers(body),
            SIGNATURE_HEADER: webhook_signature(self.secret, timestamp, body),
        }


def webhook_signature(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def webhook_signature_verify(
    secret: str, header: str, body: bytes, *, now: float, tolerance_seconds: int = 300
) -> bool:
    """What a receiver does: the signature matches and its timestamp is recent."""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    expected = webhook_signature(secret, timestamp, body).rsplit("v1=", 1)[1]
    fresh = abs(now - timestamp) <= tolerance_seconds
    return fresh and hmac.compare_digest(expected, parts.get("v1", ""))


def email_addresses(target: str) -> list[str]:
    return [a.strip() for a in target.split(",") if a.strip()]


TRANSPORTS: dict[str, type[Transport]] = {
    t.kind: t for t in (EmailTransport, SlackTransport, WebhookTransport)
}


def transport_class(kind: str) -> type[Transport]:
    try:
        return TRANSPORTS[kind]
    except KeyError:
        raise ValidationError({"kind": f"'{kind}' is not a channel kind."}) from None


def channel_kind_choices() -> list[tuple[str, str]]:
    return [(kind, cls.label) for kind, cls in TRANSPORTS.items()]
