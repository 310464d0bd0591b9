"""Which request and response headers cross the sidecar, and the X-Forwarded-* it adds.

Hop-by-hop headers (RFC 9110 §7.6.1) end at the sidecar, including every name the ``Connection``
header lists. Identity headers are removed from public traffic in every spelling a server might
fold into the same name (``X-Quota-User``, ``x_quota_user``, repeated, or listed in
``Connection``), so a browser can never name a user. ``X-Forwarded-*`` from the client are
believed only when the peer is a configured trusted proxy.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
FORWARDED = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded"})

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=1024)  # the names a deployment sees are few and come again
def fold(name: str) -> str:
    """The form under which two header names count as the same (case, ``_`` vs ``-``)."""
    return name.strip().lower().replace("_", "-")


def connection_listed(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    return {
        fold(token)
        for value in headers.getall("Connection", [])
        for token in value.split(",")
        if token.strip()
    }


def _dropped(names: Iterable[str]) -> frozenset[str]:
    """Hop-by-hop names and the folded form of a drop list; a tuple (what every caller passes)
    is folded once."""
    if isinstance(names, tuple):
        return _dropped_tuple(names)
    return HOP_BY_HOP | {fold(name) for name in names}


@functools.lru_cache(maxsize=64)
def _dropped_tuple(names: tuple[str, ...]) -> frozenset[str]:
    return HOP_BY_HOP | {fold(name) for name in names}


def filter_headers(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], *, drop: Iterable[str] = ()
) -> CIMultiDict[str]:
    """Copy ``headers`` without hop-by-hop ones and without any name in ``drop`` (folded)."""
    dropped = _dropped(drop)
    if "Connection" in headers:
        dropped = dropped | connection_listed(headers)
    return CIMultiDict(
        [(name, value) for name, value in headers.items() if fold(name) not in dropped]
    )


def strip_cookie(cookie_header: str, name: str) -> str:
    """Remove the cookie ``name`` and every ``name-…`` from a ``Cookie`` header, keeping the rest."""

    def ours(part: str) -> bool:
        key = part.split("=", 1)[0].strip()
        return key == name or key.startswith(f"{name}-")

    kept = [part.strip() for part in cookie_header.split(";") if part.strip() and not ours(part)]
    return "; ".join(kept)


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def peer_is_trusted(request: web.BaseRequest, trusted: tuple[Network, ...]) -> bool:
    if not trusted or request.remote is None:
        return False
    try:
        addr = ipaddress.ip_address(request.remote)
    except ValueError:
        return False
    return any(addr in net for net in trusted)


def _first(value: str | None) -> str | None:
    if not value:
        return None
    first = value.split(",", 1)[0].strip()
    return first or None


def client_scheme(request: web.BaseRequest, trusted: tuple[Network, ...]) -> str:
    if peer_is_trusted(request, trusted):
        proto = _first(request.headers.get("X-Forwarded-Proto"))
        if proto and proto.lower() in ("http", "https"):
            return proto.lower()
    return request.scheme


def client_host(request: web.BaseRequest, trusted: tuple[Network, ...]) -> str:
    if peer_is_trusted(request, trusted):
        host = _first(request.headers.get("X-Forwarded-Host"))
        if host and _plausible_host(host):
            return host
    return request.host


def client_origin(request: web.BaseRequest, trusted: tuple[Network, ...]) -> str:
    return f"{client_scheme(request, trusted)}://{client_host(request, trusted)}"


def _plausible_host(host: str) -> bool:
    return all(ch.isalnum() or ch in "-.:[]" for ch in host) and len(host) <= 255


def add_forwarded(
    out: CIMultiDict[str], request: web.BaseRequest, trusted: tuple[Network, ...]
) -> None:
    """Set X-Forwarded-For/Proto/Host on ``out`` (which must not carry client copies)."""
    peer = request.remote or "unknown"
    chain = request.headers.get("X-Forwarded-For") if peer_is_trusted(request, trusted) else None
    out["X-Forwarded-For"] = f"{chain}, {peer}" if chain else peer
    out["X-Forwarded-Proto"] = client_scheme(request, trusted)
    out["X-Forwarded-Host"] = client_host(request, trusted)
