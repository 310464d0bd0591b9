"""The emulator's two error families and how each is written on the wire.

    ApiError       Quota's API shape, for /v1, /auth, /developers, /_mock and unknown paths:
                   {"error": {"code", "message", "type"}}
    OAuthError     the token and revocation endpoints, written in the style the settings pick:
                   rfc6749: {"error": code, "error_description": message}
                   quota:   {"error": {"code": code, "message": message}}
    └── RefreshTokenReused   invalid_grant, raised after the whole grant has been revoked

Handlers raise; ``sidecar.mock_quota.middleware`` renders ``ApiError`` and the token routes
render ``OAuthError`` themselves (their style is a runtime setting).
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from .settings import ErrorStyle

_TYPES_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    """Quota's (OpenAI's) ``type`` for an HTTP status."""
    if status >= 500:
        return "api_error"
    return _TYPES_BY_STATUS.get(status, "invalid_request_error")


class ApiError(Exception):
    """A failure answered in Quota's API error shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def to_response(self) -> web.Response:
        return api_error_response(self.status, self.code, self.message, headers=self.headers)


def api_error_response(
    status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
) -> web.Response:
    body = {"error": {"code": code, "message": message, "type": error_type(status)}}
    return web.json_response(body, status=status, headers=headers)


class OAuthError(Exception):
    """A token- or revocation-endpoint failure (RFC 6749 §5.2 codes)."""

    def __init__(self, error: str, description: str, *, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status

    def to_response(self, style: ErrorStyle) -> web.Response:
        return oauth_error_response(self.status, self.error, self.description, style)


class RefreshTokenReused(OAuthError):
    """A rotated refresh token came back: the grant it belonged to is now revoked."""

    def __init__(self) -> None:
        super().__init__(
            "invalid_grant",
            "This refresh token was already used; the grant has been revoked.",
        )


def oauth_error_response(
    status: int, error: str, description: str, style: ErrorStyle
) -> web.Response:
    body: dict[str, object]
    if style == "quota":
        body = {"error": {"code": error, "message": description}}
    else:
        body = {"error": error, "error_description": description}
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="quota"'
    return web.json_response(body, status=status, headers=headers)
