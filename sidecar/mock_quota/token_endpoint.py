"""``/oauth/token`` (code and refresh grants) and ``/oauth/revoke``, with client authentication.

Clients authenticate with ``client_secret_post`` (``client_id`` + ``client_secret`` in the form),
``client_secret_basic`` (HTTP Basic, both parts form-urlencoded, RFC 6749 §2.3.1) or, for a
client registered as public, ``none``. Using two methods at once is refused.

The token endpoint applies ``token_delay_s`` and the injected failures before anything else
(but after counting the call under its grant type), so a test can make the Nth call slow or
failing and still assert how many calls arrived.

A successful code exchange sends the ``user.connected`` webhook; a revocation that stops the
user's last live grant with that client (a live refresh token was revoked) sends
``user.disconnected``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from urllib.parse import unquote_plus

from aiohttp import web
from multidict import MultiMapping

from . import events
from .clients import Client
from .errors import OAuthError, RefreshTokenReused, oauth_error_response
from .state import MOCK_QUOTA_KEY, MockQuota
from .wallets import user_id_for
from .webhooks import WEBHOOKS_KEY

FORM_TYPE = "application/x-www-form-urlencoded"
GRANT_TYPES = ("authorization_code", "refresh_token")
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

# The error code an injected failure answers with, by status; 5xx are all server_error.
_INJECTED_ERRORS = {
    400: "invalid_grant",
    401: "invalid_client",
    403: "access_denied",
    429: "rate_limit_exceeded",
}


def _invalid_client(description: str) -> OAuthError:
    return OAuthError("invalid_client", description, status=401)


def form_field(form: MultiMapping[object], name: str, *, required: bool = True) -> str | None:
    """One string parameter; repeated or (when required) missing is ``invalid_request``."""
    values = form.getall(name, [])
    if len(values) > 1:
        raise OAuthError("invalid_request", f"{name} is repeated.")
    value = values[0] if values else None
    if not isinstance(value, str) or not value:
        if required:
            raise OAuthError("invalid_request", f"{name} is required.")
        return None
    return value


def authenticate_client(
    quota: MockQuota, request: web.Request, form: MultiMapping[object]
) -> Client:
    """The client the request authenticates as; ``invalid_client`` (401) otherwise."""
    form_id = form_field(form, "client_id", required=False)
    form_secret = form_field(form, "client_secret", required=False)
    authorization = request.headers.get("Authorization", "")
    secret: str | None
    if authorization[:6].lower() == "basic ":
        if form_secret is not None:
            raise OAuthError("invalid_request", "Use one client authentication method, not two.")
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise _invalid_client("Malformed HTTP Basic credentials.") from exc
        raw_id, colon, raw_secret = decoded.partition(":")
        if not colon:
            raise _invalid_client("Malformed HTTP Basic credentials.")
        client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
        if form_id is not None and form_id != client_id:
            raise _invalid_client("client_id in the body differs from the Basic credentials.")
    else:
        client_id, secret = form_id or "", form_secret
    client = quota.clients.get(client_id)
    if client is None:
        raise _invalid_client("Unknown client.")
    if not client.secret_matches(secret):
        raise _invalid_client("Client authentication failed.")
    return client


def _injected_failure(quota: MockQuota, status: int) -> web.Response:
    quota.counters["token.injected_failures"] += 1
    quota.counters["token.errors"] += 1
    error = "server_error" if status >= 500 else _INJECTED_ERRORS.get(status, "invalid_request")
    response = oauth_error_response(
        status, error, "Failure injected by the Quota emulator.", quota.settings.oauth_error_style
    )
    if status in (429, 503):
        response.headers["Retry-After"] = "1"
    return response


async def token(request: web.Request) -> web.Response:
    quota = request.app[MOCK_QUOTA_KEY]
    settings = quota.settings
    form = await request.post()
    grant_type = form.get("grant_type")
    if isinstance(grant_type, str) and grant_type in GRANT_TYPES:
        quota.counters[f"token.{grant_type}"] += 1
    if settings.token_delay_s > 0:
        await asyncio.sleep(settings.token_delay_s)
    failure = settings.take_token_failure()
    if failure is not None:
        return _injected_failure(quota, failure)
    try:
        if request.content_type != FORM_TYPE:
            raise OAuthError("invalid_request", f"The body must be {FORM_TYPE}.")
        client = authenticate_client(quota, request, form)
        grant_type = form_field(form, "grant_type")
        ttl_s = settings.access_token_ttl_s
        if grant_type == "authorization_code":
            pair = quota.grants.exchange_code(
                client_id=client.client_id,
                code=form_field(form, "code") or "",
                redirect_uri=form_field(form, "redirect_uri") or "",
                code_verifier=form_field(form, "code_verifier") or "",
                access_ttl_s=ttl_s,
            )
            grant = quota.grants.grant_of(pair.access_token)
            events.user_connected(
                request.app[WEBHOOKS_KEY], user_id_for(grant.email), client.client_id, pair.scope
            )
        elif grant_type == "refresh_token":
            pair = quota.grants.refresh(
                client_id=client.client_id,
                refresh_token=form_field(form, "refresh_token") or "",
                scope=form_field(form, "scope", required=False),
                access_ttl_s=ttl_s,
            )
            quota.counters["token.refresh_ok"] += 1
        else:
            raise OAuthError("unsupported_grant_type", f"Unsupported grant_type {grant_type!r}.")
    except OAuthError as exc:
        if isinstance(exc, RefreshTokenReused):
            quota.counters["token.refresh_reuse"] += 1
        quota.counters["token.errors"] += 1
        return exc.to_response(settings.oauth_error_style)
    if settings.token_response_delay_s > 0:
        await asyncio.sleep(settings.token_response_delay_s)
    return web.json_response(pair.to_json(), headers=_NO_STORE)


async def revoke(request: web.Request) -> web.Response:
    """RFC 7009: 200 with an empty body whether or not the token was known."""
    quota = request.app[MOCK_QUOTA_KEY]
    quota.counters["revoke"] += 1
    form = await request.post()
    try:
        client = authenticate_client(quota, request, form)
        token_value = form_field(form, "token") or ""
        form_field(form, "token_type_hint", required=False)  # both kinds are searched anyway
    except OAuthError as exc:
        return exc.to_response(quota.settings.oauth_error_style)
    stopped = quota.grants.revoke(token_value, client.client_id)
    # The user is disconnected from the app only when no grant with it is left: an app that
    # revokes the grant a reconnect replaced is still connected through the new one.
    if stopped is not None:
        user_id = user_id_for(stopped.email)
        if not quota.grants.has_live_grant(user_id, stopped.client_id):
            events.user_disconnected(request.app[WEBHOOKS_KEY], user_id, stopped.client_id)
    return web.Response(status=200, headers=_NO_STORE)


def routes() -> list[web.RouteDef]:
    return [web.post("/oauth/token", token), web.post("/oauth/revoke", revoke)]
