"""Where alert webhooks may post: public addresses only, unless allowed.

A channel's URL is typed by an owner, so without a rule it could point the platform's workers
at its own network: Redis or PostgreSQL on a private address, a cloud metadata endpoint on a
link-local one. Every address the host resolves to must be global (not loopback, private,
link-local, shared, reserved or multicast), or fall in ALERTS_HTTP_ALLOWED_NETWORKS
(comma-separated CIDRs, e.g. a company's own relay). An IPv6 address that carries an IPv4 one
(IPv4-mapped, IPv4-compatible, IPv4-translated, NAT64's 64:ff9b::/96, 6to4's 2002::/16) is
judged by the IPv4 address it carries, since that is where a gateway would deliver it;
NAT64's local-use 64:ff9b:1::/48, whose layout only its own network knows, is refused.
Checked when a channel is saved (a literal address or `localhost`) and again before every
POST (every resolved address); redirects are never followed.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from alerts.conf import alerts_setting

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 prefixes whose last 32 bits are an IPv4 address (RFC 4291, 2765, 6052)
_EMBEDDING_96 = [
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible
    ipaddress.IPv6Network("::ffff:0:0/96"),  # IPv4-mapped
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64, well-known prefix
]
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


class DestinationRefused(Exception):
    """The URL's host is, or resolves to, an address alerts may not post to."""


def allowed_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    text = str(alerts_setting("ALERTS_HTTP_ALLOWED_NETWORKS") or "")
    return [
        ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()
    ]


def destination_check(url: str, *, resolve: bool) -> None:
    """Raise DestinationRefused unless every address of the URL's host may be posted to.
    With resolve=False only what the URL itself says is judged (a literal address,
    `localhost`); a name that does not resolve is left to the request to fail."""
    host = urlsplit(url).hostname or ""
    literal = _literal(host)
    if literal is not None:
        _judge(host, literal)
    elif host.rstrip(".").lower() == "localhost" or host.lower().endswith(".localhost"):
        _judge(host, ipaddress.ip_address("127.0.0.1"))
    elif resolve:
        for address in _resolved(host):
            _judge(host, address)


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _resolved(host: str) -> list[Address]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []  # the request itself will fail, and say why
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def _carried(address: Address) -> Address:
    """The IPv4 address an IPv6 transition form carries, else the address itself. `::` and
    `::1` come out as 0.0.0.0 and 0.0.0.1, refused like themselves."""
    if isinstance(address, ipaddress.IPv4Address):
        return address
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in network for network in _EMBEDDING_96):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def _judge(host: str, literal: Address) -> None:
    if isinstance(literal, ipaddress.IPv6Address) and literal in _NAT64_LOCAL:
        raise DestinationRefused(
            f"{host} is a local-use NAT64 address ({literal}); alerts do not post through it."
        )
    address = _carried(literal)
    allowed = allowed_networks()
    if any(a in network for network in allowed for a in (literal, address)):
        return
    if not address.is_global or address.is_multicast:
        raise DestinationRefused(
            f"{host} is a non-public address ({address}); alerts post only to public "
            "addresses unless ALERTS_HTTP_ALLOWED_NETWORKS allows it."
        )
