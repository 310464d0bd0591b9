"""The browser's ``/auth/quota/*`` routes on the public listener: connect, callback, and friends.

Identity always comes from the probe to the host app (``sidecar.identity``). The OAuth state in
flight lives in the encrypted cookie (``sidecar.pending``), or, for a connect link the backend
made (``sidecar.routes.users``), server-side in the token store, bound to its user. Callback
failures end at ``redirects.after_error?quota_error=<code>`` with nothing stored.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
from urllib.parse import urlencode, urlsplit, urlunsplit

from aiohttp import web

from sidecar import pending
from sidecar.config_loader import is_local_path
from sidecar.errors import (
    CallbackError,
    ForbiddenOrigin,
    NotSignedIn,
    SidecarError,
)
from sidecar.forwarding.headers import client_origin
from sidecar.identity import probe_identity
from sidecar.oauth import Pkce, QuotaOAuthError
from sidecar.pending import PENDING_COOKIES
from sidecar.routes.wallet import NO_STORE, balance_response, status_body
from sidecar.services import SERVICES, Services

log = logging.getLogger(__name__)

_ERROR_CODE = re.compile(r"^[a-z0-9_]{1,64}$")


def safe_return_to(value: str | None, default: str) -> str:
    """Only same-origin relative paths: no scheme, no ``//host``, no backslash, no control chars."""
    if value and len(value) <= 2048 and is_local_path(value):
        return value
    return default


def with_query(path: str, **params: str) -> str:
    parts = urlsplit(path)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit(("", "", parts.path, query, parts.fragment))


def callback_uri(request: web.Request, services: Services) -> str:
    configured = services.config.quota.redirect_uri
    if configured:
        return configured
    return client_origin(request, services.trusted_proxies) + "/auth/quota/callback"


async def signed_in_user(request: web.Request) -> str:
    user = await probe_identity(request)
    if user is None:
        raise NotSignedIn
    return user


async def connect(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    cfg = services.config
    user = await probe_identity(request)
    if user is None:
        if cfg.redirects.login_url:
            raise web.HTTPFound(
                with_query(cfg.redirects.login_url, return_to=request.path_qs)
                if is_local_path(cfg.redirects.login_url)
                else cfg.redirects.login_url,
                headers=NO_STORE,
            )
        raise NotSignedIn
    services.metrics.connects_started.inc()
    pkce = Pkce.generate()
    state = secrets.token_hex(32)
    redirect_uri = callback_uri(request, services)
    record = pending.Pending(
        state=state,
        verifier=pkce.verifier,
        redirect_uri=redirect_uri,
        user_key=services.user_key(user),
        return_to=safe_return_to(request.query.get("return_to"), cfg.redirects.after_connect),
        started_at=services.clock(),
    )
    url = services.quota.authorize_url(
        redirect_uri=redirect_uri, state=state, code_challenge=pkce.challenge
    )
    response = _redirect(url)
    await request.app[PENDING_COOKIES].remember(request, response, record)
    return response


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={**NO_STORE, "Location": location})


async def callback(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    response = _redirect(services.config.redirects.after_error)
    try:
        target = await _complete(request, services, response)
    except CallbackError as exc:
        log.info("connect failed: %s", exc.code, extra={"detail": exc.detail})
        services.metrics.connect_failed(exc.code)
        target = with_query(services.config.redirects.after_error, quota_error=exc.code)
    response.headers["Location"] = target
    return response


async def _complete(request: web.Request, services: Services, response: web.StreamResponse) -> str:
    query = request.query
    state = query.get("state")
    # Single use: the round-trip's cookie is deleted on ``response`` whatever the outcome.
    found = await request.app[PENDING_COOKIES].take(request, response, state)
    # No cookie for it: a connect link the backend made (GET /auth/quota/connect-url), kept
    # server-side and bound to one user. Taken (deleted) here whatever the outcome, too.
    linked = False
    if found is None:
        try:
            found = await pending.take_server_side(services.tokens.store, state)
        except SidecarError as exc:
            raise CallbackError(exc.code, detail=exc.detail) from None
        linked = found is not None
    error = query.get("error")
    if error is not None:
        raise CallbackError(error if _ERROR_CODE.match(error) else "access_denied")
    code = query.get("code")
    if not code or not state:
        raise CallbackError("invalid_callback", detail="code or state missing")
    if found is None:
        raise CallbackError("state_mismatch", detail="no pending connect with this state")
    if pending.is_expired(found, services.config.session.pending_ttl_s, services.clock()):
        raise CallbackError("state_mismatch", detail="pending connect expired")
    try:
        user = await probe_identity(request)
    except SidecarError as exc:
        raise CallbackError(exc.code) from None
    if user is None or services.user_key(user) != found.user_key:
        if linked:  # someone else opened the link, or a link made for someone else was planted
            raise CallbackError("state_mismatch", detail="connect link bound to another user")
        raise CallbackError("identity_changed", detail="the signed-in user changed mid-connect")
    try:
        record = await services.quota.exchange_code(
            code=code, redirect_uri=found.redirect_uri, verifier=found.verifier
        )
    except QuotaOAuthError as exc:
        raise CallbackError("token_exchange_failed", detail=f"Quota said {exc.code}") from None
    except SidecarError as exc:
        raise CallbackError("token_exchange_failed", detail=exc.detail) from None
    # Who the grant belongs to, here and at Quota: forwarded events name the user, and Quota's
    # webhooks name the Quota user. Not knowing the latter does not fail the connect.
    quota_user_id = await services.quota.quota_user_id(record.access_token)
    record = dataclasses.replace(record, user_id=user, quota_user_id=quota_user_id)
    try:
        await services.tokens.connect(found.user_key, record)
    except SidecarError as exc:
        await services.tokens.revoke_orphan(record)
        raise CallbackError(exc.code, detail=exc.detail) from None
    log.info("wallet connected", extra={"user_key": found.user_key[:16]})
    services.metrics.connects_completed.inc()
    return found.return_to


async def status(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    user = await signed_in_user(request)
    body = await status_body(services, services.user_key(user))
    return web.json_response(body, headers=NO_STORE)


async def disconnect(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    _check_same_origin(request, services)
    user = await signed_in_user(request)
    await services.tokens.disconnect(services.user_key(user))
    return_to = request.query.get("return_to")
    if return_to is not None:
        raise web.HTTPSeeOther(
            safe_return_to(return_to, services.config.redirects.after_connect), headers=NO_STORE
        )
    return web.json_response({"connected": False}, headers=NO_STORE)


async def balance(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    user = await signed_in_user(request)
    return await balance_response(services, services.user_key(user))


def _check_same_origin(request: web.Request, services: Services) -> None:
    """CSRF: a state-changing browser request must come from the app's own pages."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        raise ForbiddenOrigin(detail=f"Sec-Fetch-Site: {site}")
    origin = request.headers.get("Origin")
    if origin is not None and origin != client_origin(request, services.trusted_proxies):
        raise ForbiddenOrigin(detail="Origin differs from this site")


ROUTES = (
    ("GET", "/auth/quota/connect", connect),
    ("GET", "/auth/quota/callback", callback),
    ("GET", "/auth/quota/status", status),
    ("POST", "/auth/quota/disconnect", disconnect),
    ("GET", "/auth/quota/balance", balance),
)
PATHS = frozenset(path for _, path, _ in ROUTES)


def add_routes(app: web.Application) -> None:
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
