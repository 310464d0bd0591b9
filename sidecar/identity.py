"""Who the user is: named by the host app, never by the browser.

Internal listener: the host app's backend names the user in the identity header.
Public listener: the sidecar asks the host app — an *identity probe* ``GET <upstream><probe_path>``
carrying only the browser's ``Cookie`` (less the sidecar's own cookie) and ``Authorization``. A
2xx answer carrying the identity header names the user; anything else means "not signed in".
(nginx's ``auth_request``, turned around.) The result is cached on the request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from sidecar import observe
from sidecar.errors import IdentityInvalid, IdentityMissing, UpstreamUnavailable
from sidecar.forwarding.headers import fold, strip_cookie
from sidecar.services import SERVICES, Services

log = logging.getLogger(__name__)

_PROBED: web.RequestKey[str | None] = web.RequestKey("probed_user", str | None)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class _Named:
    """The user the identity header named, and their key (an HMAC): read once per request."""

    user_id: str
    user_key: str


_NAMED = web.RequestKey("named_user", _Named)


def valid_user_id(value: str, max_length: int) -> bool:
    """1..max_length visible characters (spaces inside allowed), no control characters."""
    return 0 < len(value) <= max_length and value == value.strip() and value.isprintable()


def header_identity(request: web.Request, services: Services) -> str:
    """The user the host app's backend named on an internal-listener request."""
    return _named(request, services).user_id


def header_user_key(request: web.Request, services: Services) -> str:
    """That user's store key: ``services.user_key(header_identity(…))``, made once a request."""
    return _named(request, services).user_key


def _named(request: web.Request, services: Services) -> _Named:
    if _NAMED in request:
        return request[_NAMED]
    wanted = fold(services.config.identity.header)
    values = [v for k, v in request.headers.items() if fold(k) == wanted]
    if not values:
        raise IdentityMissing
    max_length = services.config.identity.max_length
    if len(values) > 1 or not valid_user_id(values[0], max_length):
        raise IdentityInvalid(
            f"The user identity is not usable: it must be 1 to {max_length} visible characters, "
            "sent once."
        )
    named = request[_NAMED] = _Named(values[0], services.user_key(values[0]))
    observe.note_user(request, named.user_key)
    return named


async def probe_identity(request: web.Request) -> str | None:
    """Ask the host app who sent this browser request; ``None`` when nobody is signed in."""
    if _PROBED in request:
        return request[_PROBED]
    services = request.app[SERVICES]
    user = await _probe(request, services)
    request[_PROBED] = user
    if user is not None:
        observe.note_user(request, services.user_key(user))
    return user


async def _probe(request: web.Request, services: Services) -> str | None:
    cfg = services.config
    headers: CIMultiDict[str] = CIMultiDict()
    cookie = request.headers.get("Cookie")
    if cookie:
        cookie = strip_cookie(cookie, cfg.session.cookie_name)
        if cookie:
            headers["Cookie"] = cookie
    if "Authorization" in request.headers:
        headers["Authorization"] = request.headers["Authorization"]
    headers["Accept"] = "application/json"
    url = cfg.upstream.url.rstrip("/") + cfg.upstream.identity_probe_path
    timeout = aiohttp.ClientTimeout(
        total=cfg.upstream.probe_timeout_s, sock_connect=cfg.upstream.connect_timeout_s
    )
    try:
        async with services.upstream_http.get(
            url, headers=headers, timeout=timeout, allow_redirects=False
        ) as resp:
            await resp.read()
            if not 200 <= resp.status < 300:
                return None
            values = resp.headers.getall(cfg.identity.header, [])
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise UpstreamUnavailable(
            "The app behind the sidecar did not answer the identity check; try again shortly.",
            detail=f"identity probe: {type(exc).__name__}",
        ) from None
    if len(values) != 1 or not valid_user_id(values[0], cfg.identity.max_length):
        if values:
            log.warning(
                "identity probe answered an unusable identity header; treating as signed out"
            )
        return None
    return values[0]
