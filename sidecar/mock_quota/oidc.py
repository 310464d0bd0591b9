"""OpenID discovery, the (empty) key set and ``/oauth/userinfo``.

The issuer is the request's own origin, so the emulator describes itself correctly on any
host and port, including a port picked at random by a test.
"""

from __future__ import annotations

from aiohttp import web

from .bearer import require_bearer
from .scopes import KNOWN_SCOPES
from .state import MOCK_QUOTA_KEY
from .token_endpoint import GRANT_TYPES

CLIENT_AUTH_METHODS = ["client_secret_post", "client_secret_basic", "none"]


def issuer(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


async def discovery(request: web.Request) -> web.Response:
    base = issuer(request)
    return web.json_response(
        {
            "issuer": base,
            "authorization_endpoint": f"{base}/oauth/authorize",
            "token_endpoint": f"{base}/oauth/token",
            "userinfo_endpoint": f"{base}/oauth/userinfo",
            "revocation_endpoint": f"{base}/oauth/revoke",
            "jwks_uri": f"{base}/.well-known/jwks.json",
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": list(GRANT_TYPES),
            "token_endpoint_auth_methods_supported": CLIENT_AUTH_METHODS,
            "revocation_endpoint_auth_methods_supported": CLIENT_AUTH_METHODS,
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": list(KNOWN_SCOPES),
            "subject_types_supported": ["public"],
            "claims_supported": ["sub", "email"],
        }
    )


async def jwks(request: web.Request) -> web.Response:
    """The emulator signs no ID tokens, so its key set is empty."""
    return web.json_response({"keys": []})


async def userinfo(request: web.Request) -> web.Response:
    request.app[MOCK_QUOTA_KEY].counters["userinfo"] += 1
    bearer = require_bearer(request)
    return web.json_response({"sub": bearer.user_id, "email": bearer.email})


def routes() -> list[web.RouteDef]:
    return [
        web.get("/.well-known/openid-configuration", discovery, allow_head=False),
        web.get("/.well-known/jwks.json", jwks, allow_head=False),
        web.get("/oauth/userinfo", userinfo, allow_head=False),
        web.post("/oauth/userinfo", userinfo),
    ]
