"""The developer side of Quota: ``/auth/login`` for a session, ``/developers/apps`` for clients.

Registration validates like Quota: redirect URIs absolute http(s), https unless the host is
loopback, no fragments; scopes from the documented set. The secret is returned once, at
creation; listings never carry it.
"""

from __future__ import annotations

from aiohttp import web

from .bearer import bearer_token
from .body import json_object
from .clients import redirect_uri_problem
from .errors import ApiError
from .scopes import KNOWN_SCOPES
from .state import MOCK_QUOTA_KEY, MockQuota

SESSION_PREFIX = "sess_"


def _developer(request: web.Request, quota: MockQuota) -> str:
    token = bearer_token(request)
    email = quota.developer_for_session(token) if token else None
    if email is None:
        code = "invalid_token" if token and token.startswith(SESSION_PREFIX) else "invalid_api_key"
        raise ApiError(401, code, "A developer session (Authorization: Bearer sess_…) is required.")
    return email


async def login(request: web.Request) -> web.Response:
    quota = request.app[MOCK_QUOTA_KEY]
    body = await json_object(request)
    email, password = body.get("email"), body.get("password")
    if not isinstance(email, str) or not isinstance(password, str):
        raise ApiError(400, "invalid_request", "email and password are required strings.")
    session = quota.login(email, password)
    if session is None:
        raise ApiError(401, "invalid_credentials", "Wrong email or password.")
    return web.json_response({"session_token": session})


def _string_list(body: dict[str, object], name: str) -> list[str]:
    value = body.get(name)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ApiError(400, "invalid_request", f"{name} must be a non-empty list of strings.")
    return list(dict.fromkeys(value))


async def create_app(request: web.Request) -> web.Response:
    quota = request.app[MOCK_QUOTA_KEY]
    owner = _developer(request, quota)
    body = await json_object(request)
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ApiError(400, "invalid_request", "name must be a non-empty string.")
    redirect_uris = _string_list(body, "redirect_uris")
    problems = [p for p in map(redirect_uri_problem, redirect_uris) if p]
    if problems:
        raise ApiError(400, "invalid_redirect_uri", "; ".join(problems))
    scopes = _string_list(body, "allowed_scopes")
    unknown = [s for s in scopes if s not in KNOWN_SCOPES]
    if unknown:
        raise ApiError(
            400,
            "invalid_scope",
            f"Unknown scopes: {', '.join(unknown)}. Known: {', '.join(KNOWN_SCOPES)}.",
        )
    client = quota.register_client(
        name=name.strip(), redirect_uris=redirect_uris, allowed_scopes=scopes, owner_email=owner
    )
    quota.counters["apps.created"] += 1
    return web.json_response(client.to_json(with_secret=True), status=201)


async def list_apps(request: web.Request) -> web.Response:
    quota = request.app[MOCK_QUOTA_KEY]
    owner = _developer(request, quota)
    apps = [client.to_json(with_secret=False) for client in quota.apps_of(owner)]
    return web.json_response({"object": "list", "data": apps})


def routes() -> list[web.RouteDef]:
    return [
        web.post("/auth/login", login),
        web.post("/developers/apps", create_app),
        web.get("/developers/apps", list_apps, allow_head=False),
    ]
