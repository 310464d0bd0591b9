"""Top-ups: the package list, the trip to Quota's checkout, and the hint on 402 answers.

    GET /auth/quota/packages     Quota's ``GET /v1/packages``, passed through (no sign-in needed)
    GET /auth/quota/topup        ?package=<id>[&return_to=<path>]: a signed-in user with a
                                 connected wallet is sent (303) to Quota's checkout page; Quota
                                 sends the browser back to the app's own origin afterwards
    /v1 answers                  a 402 ``insufficient_credits`` gains ``X-Quota-Topup-Url``

Errors on ``/auth/quota/topup`` are JSON for API clients and, for a browser navigating there, a
redirect to ``redirects.after_error?quota_error=<code>`` — as the connect callback does.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from sidecar.config import Config, TopupConfig
from sidecar.config_loader import is_local_path
from sidecar.errors import (
    ForbiddenOrigin,
    InvalidPackage,
    NotSignedIn,
    QuotaUnavailable,
    SidecarError,
    TopupUnavailable,
)
from sidecar.forwarding.headers import client_origin, filter_headers
from sidecar.oauth import Checkout, QuotaOAuthError
from sidecar.observe import error_code
from sidecar.routes.browser import safe_return_to, signed_in_user, with_query
from sidecar.routes.wallet import NO_STORE
from sidecar.services import SERVICES, Services

log = logging.getLogger(__name__)

TOPUP_PATH = "/auth/quota/topup"
TOPUP_URL_HEADER = "X-Quota-Topup-Url"
_PACKAGE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Packages change rarely and are the same for everyone: one copy serves every browser a minute.
PACKAGES_TTL_S = 60.0
# A 402 body is read whole (to find its code) only up to this size; Quota's are a few hundred bytes.
PEEK_MAX_BYTES = 16 * 1024


# --- the app's public origin ----------------------------------------------------------------


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def configured_origin(config: Config) -> str | None:
    """The app's public origin for answers with no browser behind them (the internal listener):
    ``quota.redirect_uri``'s, else ``topup.public_url``'s; ``None`` when neither is set."""
    for url in (config.quota.redirect_uri, config.topup.public_url):
        if url:
            return _origin(url)
    return None


def public_origin(request: web.Request, services: Services) -> str:
    """The origin this browser uses for the app, built like the connect's callback URI:
    ``quota.redirect_uri``'s when set, else the request's own (proxies believed when trusted)."""
    configured = services.config.quota.redirect_uri
    if configured:
        return _origin(configured)
    return client_origin(request, services.trusted_proxies)


def return_urls(origin: str, return_to: str | None, cfg: TopupConfig) -> tuple[str, str]:
    """Where Quota's checkout sends the browser back: (after paying, after cancelling)."""
    target = safe_return_to(return_to, "")
    if target:
        return (
            origin + with_query(target, quota_topup="success"),
            origin + with_query(target, quota_topup="cancelled"),
        )
    return origin + cfg.success_path, origin + cfg.cancel_path


# --- GET /auth/quota/packages ---------------------------------------------------------------


@dataclass(slots=True)
class _PackagesCache:
    body: bytes = b""
    fetched_at: float = float("-inf")


PACKAGES_CACHE = web.AppKey("topup_packages", _PackagesCache)


async def packages(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    cache = request.app[PACKAGES_CACHE]
    now = services.clock()
    if not cache.body or now - cache.fetched_at >= PACKAGES_TTL_S:
        try:
            body = await services.quota.packages()
        except QuotaOAuthError as exc:
            raise TopupUnavailable(detail=f"packages answered {exc.status} {exc.code}") from None
        cache.body, cache.fetched_at = body, now
    return web.Response(
        body=cache.body,
        content_type="application/json",
        headers={"Cache-Control": f"private, max-age={int(PACKAGES_TTL_S)}"},
    )


# --- GET /auth/quota/topup ------------------------------------------------------------------


def wants_page(request: web.Request) -> bool:
    """A browser navigating here (rather than a script or an API client calling it)."""
    mode = request.headers.get("Sec-Fetch-Mode")
    if mode is not None:
        return mode == "navigate"
    return "text/html" in request.headers.get("Accept", "")


async def topup(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    redirects = services.config.redirects
    try:
        location = await _checkout_location(request, services)
    except SidecarError as exc:
        if not wants_page(request):
            raise
        log.info("top-up not started: %s", exc.code, extra={"detail": exc.detail})
        if isinstance(exc, NotSignedIn) and redirects.login_url:
            location = (
                with_query(redirects.login_url, return_to=request.path_qs)
                if is_local_path(redirects.login_url)
                else redirects.login_url
            )
        else:
            location = with_query(redirects.after_error, quota_error=exc.code)
    return web.Response(status=303, headers={**NO_STORE, "Location": location})


async def _checkout_location(request: web.Request, services: Services) -> str:
    if (
        request.headers.get("Sec-Fetch-Site") == "cross-site"
        and request.headers.get("Sec-Fetch-Mode", "navigate") != "navigate"
    ):
        # Another site's image or script tag would open checkouts at Quota in the user's name;
        # a link (a top-level navigation) only takes the user to a page where they decide.
        raise ForbiddenOrigin(detail="cross-site subresource request")
    package = request.query.get("package", "")
    if not _PACKAGE_ID.match(package):
        raise InvalidPackage(detail="malformed package id")
    user_key = services.user_key(await signed_in_user(request))
    success_url, cancel_url = return_urls(
        public_origin(request, services), request.query.get("return_to"), services.config.topup
    )
    checkout = await _open_checkout(services, user_key, package, success_url, cancel_url)
    location = checked_checkout_url(checkout.url, services.config.quota.base_url)
    services.metrics.topups_started.inc()
    log.info("top-up started", extra={"user_key": user_key[:16], "checkout": checkout.id})
    return location


async def _open_checkout(
    services: Services, user_key: str, package: str, success_url: str, cancel_url: str
) -> Checkout:
    """Quota's checkout for this user; a refused token gets one forced refresh, as /v1 calls do."""

    async def create(access_token: str) -> Checkout:
        return await services.quota.create_checkout(
            access_token, package_id=package, success_url=success_url, cancel_url=cancel_url
        )

    record = await services.tokens.fresh(user_key)
    try:
        return await create(record.access_token)
    except QuotaOAuthError as exc:
        if exc.status != 401:
            raise _refused(exc, package) from None
    record = await services.tokens.after_rejection(user_key, record)
    try:
        return await create(record.access_token)
    except QuotaOAuthError as exc:
        raise _refused(exc, package) from None


def _refused(exc: QuotaOAuthError, package: str) -> SidecarError:
    if exc.code == "invalid_package":
        return InvalidPackage(detail=f"Quota knows no package {package!r}")
    return TopupUnavailable(detail=f"checkout answered {exc.status} {exc.code}")


def checked_checkout_url(url: str, quota_base_url: str) -> str:
    """Quota's checkout URL, if it is one a browser may be sent to: absolute https — or http
    when Quota itself is reached over http (the emulator)."""
    parts = urlsplit(url)
    schemes = ("https", "http") if urlsplit(quota_base_url).scheme == "http" else ("https",)
    if (
        parts.scheme not in schemes
        or not parts.hostname
        or any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in url)
        or len(url) > 4096
    ):
        raise TopupUnavailable(detail="checkout answered with an unusable url")
    return url


# --- the 402 hint on /v1 answers ------------------------------------------------------------


def note_topup_origin(config: Config) -> None:
    """Say once, at start-up, when 402 answers cannot carry the top-up URL."""
    if configured_origin(config) is None:
        log.info(
            "402 insufficient_credits answers will not carry %s: set topup.public_url (the app's "
            "public origin) or quota.redirect_uri",
            TOPUP_URL_HEADER,
        )


async def answer_payment_required(
    request: web.Request,
    services: Services,
    upstream: aiohttp.ClientResponse,
    *,
    on_chunk: Callable[[bytes], None] | None = None,
) -> web.StreamResponse | None:
    """Quota's small JSON 402 with ``X-Quota-Topup-Url`` added when its code is
    ``insufficient_credits``; the body goes out byte for byte. ``None`` for every other answer
    (the caller streams it as usual)."""
    if upstream.status != 402:
        return None
    length = upstream.headers.get("Content-Length", "")
    origin = configured_origin(services.config)
    if (
        origin is None
        or not length.isdigit()
        or int(length) > PEEK_MAX_BYTES
        or "json" not in upstream.headers.get("Content-Type", "")
        or upstream.headers.get("Content-Encoding", "identity") != "identity"
    ):
        return None
    try:
        body = await upstream.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise QuotaUnavailable(detail=f"402 body: {type(exc).__name__}") from None
    finally:
        upstream.release()
    if on_chunk is not None and body:
        on_chunk(body)
    headers = filter_headers(upstream.headers, drop=("content-length",))
    if error_code(body) == "insufficient_credits":
        headers[TOPUP_URL_HEADER] = origin + TOPUP_PATH
    return web.Response(status=402, reason=upstream.reason, headers=headers, body=body)


ROUTES = (
    ("GET", "/auth/quota/packages", packages),
    ("GET", TOPUP_PATH, topup),
)
PATHS = frozenset(path for _, path, _ in ROUTES)


def add_routes(app: web.Application) -> None:
    app[PACKAGES_CACHE] = _PackagesCache()
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
