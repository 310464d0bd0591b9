"""The backend's view of any user's wallet: connect status, forget, and ready connect links.

Internal listener only, behind its API key when one is configured. The user is named in the path
or the query, not in the identity header, so a job or an admin page can ask about users other
than the one making a request; ids are checked like the identity header (1 to
``identity.max_length`` visible characters).

    GET    /auth/quota/users/{id}                        the connection's state
    DELETE /auth/quota/users/{id}                        forget it (revoked at Quota, best effort)
    GET    /auth/quota/connect-url?user=…&return_to=…    a Quota authorize URL for that user

A connect link is made without a browser, so its pending state (PKCE verifier, redirect URI,
bound user, ``return_to``) is kept server-side, sealed in the token store for
``session.pending_ttl_s`` and taken once by the callback (``sidecar.pending``). The callback
completes only if the identity probe names the same user: a link that leaks, or that an attacker
made for themselves, connects no one else's wallet. The redirect URI must be the configured
``quota.redirect_uri``: with no browser request there is no Host to derive it from.
"""

from __future__ import annotations

import secrets
from typing import Any

from aiohttp import web

from sidecar import observe, pending
from sidecar.errors import IdentityInvalid, PublicUrlUnknown
from sidecar.identity import valid_user_id
from sidecar.oauth import Pkce
from sidecar.routes.browser import safe_return_to
from sidecar.routes.wallet import NO_STORE, connection_state
from sidecar.services import SERVICES, Services
from sidecar.tokens.model import TokenRecord


def named_user(request: web.Request, services: Services, value: str | None) -> tuple[str, str]:
    """The user id named in the path or query, and its user key; 400 if it is not usable."""
    max_length = services.config.identity.max_length
    if value is None or not valid_user_id(value, max_length):
        raise IdentityInvalid(
            f"Name the user by the id the app uses in the identity header: 1 to {max_length} "
            "visible characters."
        )
    user_key = services.user_key(value)
    observe.note_user(request, user_key)
    return value, user_key


def user_status(user: str, record: TokenRecord | None) -> dict[str, Any]:
    last_refresh = None
    if record is not None and record.last_refresh_outcome is not None:
        at = record.last_refresh_at
        last_refresh = {
            "outcome": record.last_refresh_outcome,
            "at": int(at) if at is not None else None,
        }
    return {
        "user": user,
        "state": connection_state(record),
        "scopes": list(record.scopes) if record else [],
        "missing_scope": list(record.missing_scopes) if record else [],
        "expires_at": int(record.expires_at) if record else None,
        "last_refresh": last_refresh,
        "quota_user_id": record.quota_user_id if record else None,
    }


async def status(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    user, user_key = named_user(request, services, request.match_info["id"])
    record = await services.tokens.current(user_key)
    return web.json_response(user_status(user, record), headers=NO_STORE)


async def forget(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    user, user_key = named_user(request, services, request.match_info["id"])
    deleted = await services.tokens.disconnect(user_key)
    return web.json_response(
        {"user": user, "state": "not_connected", "deleted": deleted}, headers=NO_STORE
    )


async def connect_url(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    cfg = services.config
    _, user_key = named_user(request, services, request.query.get("user"))
    redirect_uri = cfg.quota.redirect_uri
    if redirect_uri is None:
        raise PublicUrlUnknown(detail="connect-url needs quota.redirect_uri")
    pkce = Pkce.generate()
    state = secrets.token_hex(32)
    started_at = services.clock()
    ttl_s = cfg.session.pending_ttl_s
    await pending.remember_server_side(
        services.tokens.store,
        pending.Pending(
            state=state,
            verifier=pkce.verifier,
            redirect_uri=redirect_uri,
            user_key=user_key,
            return_to=safe_return_to(request.query.get("return_to"), cfg.redirects.after_connect),
            started_at=started_at,
        ),
        ttl_s,
    )
    services.metrics.connects_started.inc()
    url = services.quota.authorize_url(
        redirect_uri=redirect_uri, state=state, code_challenge=pkce.challenge
    )
    return web.json_response({"url": url, "expires_at": int(started_at + ttl_s)}, headers=NO_STORE)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/auth/quota/users/{id}", status)
    app.router.add_delete("/auth/quota/users/{id}", forget)
    app.router.add_get("/auth/quota/connect-url", connect_url)
