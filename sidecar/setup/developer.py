"""Quota's developer API, as ``init`` uses it: sign in, then register an OAuth app.

    POST /auth/login        {email, password}                     → {session_token: "sess_…"}
    POST /developers/apps   Bearer sess_…; {name, redirect_uris, allowed_scopes}
                                                                   → {client_id, client_secret, …}

Every failure becomes one ``DeveloperApiError`` with a stable ``code``: Quota's own (such as
``invalid_credentials`` or ``invalid_redirect_uri``, read from either error-body style), or
``unreachable`` and ``unexpected_response`` for what went wrong on the way. Messages are one
line and never carry a password, a session token or a client secret.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from sidecar.secret import Secret

SESSION_PREFIX = "sess_"
# Sign-in and registration are two small calls; a person is waiting on them.
TIMEOUT = aiohttp.ClientTimeout(total=15, sock_connect=5)
_MAX_MESSAGE = 300  # Quota's messages are short; a proxy's HTML error page is not


class DeveloperApiError(Exception):
    """Quota refused a developer call (``code`` is Quota's), or could not be asked."""

    def __init__(self, code: str, message: str, *, status: int | None = None) -> None:
        self.code = code
        self.message = message
        self.status = status
        super().__init__(f"{message} ({code})")


@dataclass(frozen=True, slots=True)
class RegisteredApp:
    client_id: str
    client_secret: Secret
    name: str
    redirect_uris: tuple[str, ...]
    allowed_scopes: tuple[str, ...]


async def login(http: aiohttp.ClientSession, base_url: str, email: str, password: str) -> str:
    """A developer session token (``sess_…``) for ``email``."""
    body = await _post(http, base_url, "/auth/login", {"email": email, "password": password})
    token = body.get("session_token")
    if not isinstance(token, str) or not token:
        raise DeveloperApiError(
            "unexpected_response", "Quota's sign-in answer carried no session_token"
        )
    return token


async def register_app(
    http: aiohttp.ClientSession,
    base_url: str,
    session_token: str,
    *,
    name: str,
    redirect_uris: Sequence[str],
    scopes: Sequence[str],
) -> RegisteredApp:
    """Register an OAuth app; Quota shows its client secret in this answer only."""
    body = await _post(
        http,
        base_url,
        "/developers/apps",
        {"name": name, "redirect_uris": list(redirect_uris), "allowed_scopes": list(scopes)},
        session_token=session_token,
    )
    client_id, client_secret = body.get("client_id"), body.get("client_secret")
    if not isinstance(client_id, str) or not client_id:
        raise DeveloperApiError("unexpected_response", "Quota's answer carried no client_id")
    if not isinstance(client_secret, str) or not client_secret:
        raise DeveloperApiError("unexpected_response", "Quota's answer carried no client_secret")
    return RegisteredApp(
        client_id=client_id,
        client_secret=Secret(client_secret),
        name=str(body.get("name") or name),
        redirect_uris=_strings(body.get("redirect_uris"), redirect_uris),
        allowed_scopes=_strings(body.get("allowed_scopes"), scopes),
    )


def _strings(value: object, fallback: Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return tuple(fallback)


async def _post(
    http: aiohttp.ClientSession,
    base_url: str,
    path: str,
    payload: dict[str, Any],
    *,
    session_token: str | None = None,
) -> dict[str, Any]:
    headers = {"Accept": "application/json"}
    if session_token is not None:
        headers["Authorization"] = f"Bearer {session_token}"
    url = base_url.rstrip("/") + path
    try:
        async with http.post(
            url, json=payload, headers=headers, timeout=TIMEOUT, allow_redirects=False
        ) as resp:
            status, raw = resp.status, await resp.read()
    except TimeoutError:
        raise DeveloperApiError(
            "unreachable", f"Quota at {base_url} did not answer POST {path} in time"
        ) from None
    except aiohttp.ClientError as exc:
        raise DeveloperApiError(
            "unreachable", f"cannot reach Quota at {base_url} ({_reason(exc)})"
        ) from None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        body = None
    if status >= 400:
        code, message = _error_of(body)
        raise DeveloperApiError(
            code or f"http_{status}",
            message or f"Quota answered POST {path} with HTTP {status}",
            status=status,
        )
    if not isinstance(body, dict):
        raise DeveloperApiError(
            "unexpected_response", f"Quota answered POST {path} with something other than JSON"
        )
    return body


def _error_of(body: object) -> tuple[str | None, str | None]:
    """Quota's ``{"error": {"code", "message"}}`` or RFC 6749's ``{"error", "error_description"}``."""
    if not isinstance(body, dict):
        return None, None
    error = body.get("error")
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
    else:
        code, message = error, body.get("error_description")
    return (
        code if isinstance(code, str) and code else None,
        _one_line(message) if isinstance(message, str) and message.strip() else None,
    )


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _MAX_MESSAGE else flat[: _MAX_MESSAGE - 1] + "…"


def _reason(exc: aiohttp.ClientError) -> str:
    """What failed, without the URL again: ``connection refused``, a DNS error, a TLS error."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        code = error.errno or 0  # DNS errors (socket.gaierror) have negative codes
        text = os.strerror(code) if code > 0 else error.strerror or str(error)
        return _one_line(text.lower()) if text else type(exc).__name__
    return type(exc).__name__
