"""Who is calling: the bearer token on an API request, checked for life and scope.

    no bearer, or an unknown / expired / revoked ``quota_token_…``  -> 401 invalid_token
    any other bearer (``sk-quota-…``, ``sess_…``, garbage)          -> 401 invalid_api_key
    a live token without the route's scope                           -> 403 insufficient_scope

A missing scope is a 403, which a refresh cannot fix: the user must connect again.
"""

from __future__ import annotations

from aiohttp import web

from .errors import ApiError
from .grants import Bearer
from .state import MOCK_QUOTA_KEY

ACCESS_TOKEN_PREFIX = "quota_token_"  # noqa: S105 - a prefix, not a secret


def bearer_token(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def require_bearer(request: web.Request, scope: str | None = None) -> Bearer:
    """The caller, with ``scope`` if one is named; raises ``ApiError`` otherwise."""
    token = bearer_token(request)
    if token is None:
        raise ApiError(
            401,
            "invalid_token",
            "Missing bearer token: send Authorization: Bearer <access token>.",
            headers={"WWW-Authenticate": 'Bearer realm="quota"'},
        )
    if not token.startswith(ACCESS_TOKEN_PREFIX):
        raise ApiError(
            401,
            "invalid_api_key",
            "The API key is not valid.",
            headers={"WWW-Authenticate": 'Bearer realm="quota", error="invalid_token"'},
        )
    bearer = request.app[MOCK_QUOTA_KEY].grants.authenticate(token)
    if scope is not None and scope not in bearer.scopes:
        raise ApiError(
            403,
            "insufficient_scope",
            f"This token lacks the {scope} scope; the user must connect again to grant it.",
            headers={
                "WWW-Authenticate": (
                    f'Bearer realm="quota", error="insufficient_scope", scope="{scope}"'
                )
            },
        )
    return bearer
