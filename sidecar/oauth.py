"""The Quota OAuth client: authorize URLs, code exchange, refresh, revoke and small JSON reads.

Every call that leaves for Quota goes through here, so this is where aiohttp's exceptions and
Quota's two error-body styles (RFC 6749 ``{"error", "error_description"}`` and Quota's
``{"error": {"code", "message"}}``) become the sidecar's own errors:

    QuotaOAuthError(code, status)     Quota answered with an OAuth error (invalid_grant, …)
    QuotaUnavailable                  timeout, connection error, 5xx or an unreadable answer

Token values never appear in an exception message or a log line.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp

from sidecar.config import QuotaConfig
from sidecar.errors import QuotaUnavailable
from sidecar.tokens.model import TokenRecord

log = logging.getLogger(__name__)

MAX_ID_CHARS = 256  # a Quota user id longer than this is not one
# Errors that mean the grant itself is gone: the user must connect again.
GRANT_ENDED = frozenset({"invalid_grant", "invalid_token", "unauthorized_client"})


class QuotaOAuthError(Exception):
    """Quota refused an OAuth call with a definite answer (4xx with an error code)."""

    def __init__(self, code: str, status: int) -> None:
        self.code = code
        self.status = status
        super().__init__(f"Quota answered {status} {code}")

    @property
    def grant_ended(self) -> bool:
        return self.code in GRANT_ENDED or self.code == "invalid_client"


@dataclass(frozen=True, slots=True)
class Pkce:
    verifier: str
    challenge: str

    @classmethod
    def generate(cls) -> Pkce:
        verifier = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
        return cls(verifier, s256(verifier))


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class QuotaClient:
    """Talks to Quota's OAuth endpoints and the small JSON reads the browser routes need."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: QuotaConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._session = session
        self._config = config
        self._clock = clock
        self._base = config.base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(
            total=config.timeout_s, sock_connect=config.connect_timeout_s
        )

    @property
    def base_url(self) -> str:
        return self._base

    def authorize_url(self, *, redirect_uri: str, state: str, code_challenge: str) -> str:
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self._config.client_id,
                "redirect_uri": redirect_uri,
                "scope": " ".join(self._config.scopes),
                "state": state,
                "code_challenge": code_challenge,
                "code_challenge_method": "S256",
            }
        )
        return f"{self._base}/oauth/authorize?{query}"

    async def exchange_code(self, *, code: str, redirect_uri: str, verifier: str) -> TokenRecord:
        """Trade an authorization code for tokens. Never retried: codes are single-use."""
        return await self._token_call(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": verifier,
            }
        )

    async def refresh(self, refresh_token: str) -> TokenRecord:
        return await self._token_call(
            {"grant_type": "refresh_token", "refresh_token": refresh_token}
        )

    async def revoke(self, token: str, *, hint: str = "refresh_token") -> None:
        """RFC 7009 revocation. Raises like the other calls; callers decide whether it matters."""
        form = {"token": token, "token_type_hint": hint, **self._client_auth()}
        status, body = await self._post_form("/oauth/revoke", form)
        if status >= 500:
            raise QuotaUnavailable(detail=f"revoke answered {status}")
        if status >= 400:
            raise QuotaOAuthError(_error_code(body) or f"http_{status}", status)

    async def get_json(self, path: str, access_token: str) -> tuple[int, bytes, str]:
        """A small authenticated GET (e.g. ``/v1/balance``): status, raw body, content type."""
        try:
            async with self._session.get(
                f"{self._base}{path}",
                headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
                timeout=self._timeout,
            ) as resp:
                body = await resp.read()
                return resp.status, body, resp.headers.get("Content-Type", "application/json")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise QuotaUnavailable(detail=f"GET {path}: {type(exc).__name__}") from None

    async def quota_user_id(self, access_token: str) -> str | None:
        """Who the token belongs to at Quota: ``/oauth/userinfo``'s ``sub``, else the
        ``user_id`` of ``/v1/balance`` (for grants without ``openid``). ``None`` when neither
        answers with one: knowing it is useful (Quota's webhooks name users by it), not needed.
        """
        for path, field in (("/oauth/userinfo", "sub"), ("/v1/balance", "user_id")):
            try:
                status, body, _ = await self.get_json(path, access_token)
            except QuotaUnavailable as exc:
                log.warning("could not ask Quota who the user is (%s)", exc.detail)
                continue
            found = _string_field(body, field) if status == 200 else None
            if found is not None:
                return found
            log.info("Quota's %s gave no %s (status %s)", path, field, status)
        log.warning("Quota did not say who the user is; its webhooks cannot reach this grant")
        return None

    def _client_auth(self) -> dict[str, str]:
        return {
            "client_id": self._config.client_id,
            "client_secret": self._config.client_secret.reveal(),
        }

    async def _token_call(self, form: dict[str, str]) -> TokenRecord:
        grant = form["grant_type"]
        sent_at = self._clock()
        status, body = await self._post_form("/oauth/token", {**form, **self._client_auth()})
        if status >= 500 or status == 429:
            raise QuotaUnavailable(detail=f"token endpoint ({grant}) answered {status}")
        if status >= 400:
            code = _error_code(body)
            if code is None:
                raise QuotaUnavailable(
                    detail=f"token endpoint ({grant}) answered {status} without an error code"
                )
            raise QuotaOAuthError(code, status)
        return _parse_tokens(body, sent_at=sent_at, grant=grant)

    async def _post_form(self, path: str, form: dict[str, str]) -> tuple[int, bytes]:
        try:
            async with self._session.post(
                f"{self._base}{path}",
                data=form,
                headers={"Accept": "application/json"},
                timeout=self._timeout,
            ) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise QuotaUnavailable(detail=f"POST {path}: {type(exc).__name__}") from None

    # --- top-up: packages and checkout (sidecar.routes.topup) -------------------------------

    async def packages(self) -> bytes:
        """Quota's ``GET /v1/packages`` (no token needed): the raw JSON list, as Quota sent it."""
        status, body = await self._call_json("GET", "/v1/packages")
        data = _json_object(body)
        if status >= 500 or status == 429 or data is None:
            raise QuotaUnavailable(detail=f"packages answered {status}")
        if status >= 400:
            raise QuotaOAuthError(_error_code(body) or f"http_{status}", status)
        if status != 200 or not isinstance(data.get("data"), list):
            raise QuotaUnavailable(detail=f"packages answered {status} without a list")
        return body

    async def create_checkout(
        self, access_token: str, *, package_id: str, success_url: str, cancel_url: str
    ) -> Checkout:
        """``POST /api/payments/checkout`` for the token's user; Quota answers a page to pay on."""
        status, body = await self._call_json(
            "POST",
            "/api/payments/checkout",
            token=access_token,
            payload={
                "package_id": package_id,
                "success_url": success_url,
                "cancel_url": cancel_url,
            },
        )
        data = _json_object(body)
        if status >= 500 or status == 429:
            raise QuotaUnavailable(detail=f"checkout answered {status}")
        if status >= 400:
            code = _error_code(body)
            if code is None:
                raise QuotaUnavailable(detail=f"checkout answered {status} without an error code")
            raise QuotaOAuthError(code, status)
        url = data.get("url") if data is not None else None
        if not isinstance(url, str) or not url:
            raise QuotaUnavailable(detail=f"checkout answered {status} without a url")
        session_id = data.get("id") if data is not None else None
        return Checkout(id=session_id if isinstance(session_id, str) else "", url=url)

    async def _call_json(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        payload: dict[str, Any] | None = None,
    ) -> tuple[int, bytes]:
        # Bodies are read raw (the session does not decompress): ask for them uncompressed.
        headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with self._session.request(
                method,
                f"{self._base}{path}",
                json=payload,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise QuotaUnavailable(detail=f"{method} {path}: {type(exc).__name__}") from None


@dataclass(frozen=True, slots=True)
class Checkout:
    """A checkout Quota opened: its id and the page (``url``) where the user pays."""

    id: str
    url: str


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _parse_tokens(body: bytes, *, sent_at: float, grant: str) -> TokenRecord:
    """Validate a token response; anything malformed is Quota being unavailable, not a grant loss."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise QuotaUnavailable(detail=f"token endpoint ({grant}) sent non-JSON") from None
    if not isinstance(data, dict):
        raise QuotaUnavailable(detail=f"token endpoint ({grant}) sent a non-object")
    access, refresh, expires_in = (
        data.get("access_token"),
        data.get("refresh_token"),
        data.get("expires_in"),
    )
    if not isinstance(access, str) or not access:
        raise QuotaUnavailable(detail=f"token endpoint ({grant}) sent no access_token")
    if not isinstance(refresh, str) or not refresh:
        raise QuotaUnavailable(detail=f"token endpoint ({grant}) sent no refresh_token")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        raise QuotaUnavailable(detail=f"token endpoint ({grant}) sent no usable expires_in")
    scope = data.get("scope")
    return TokenRecord(
        access_token=access,
        refresh_token=refresh,
        # Count from when the call was sent: the token may have been issued any time after.
        expires_at=sent_at + float(expires_in),
        scope=scope if isinstance(scope, str) else "",
        obtained_at=sent_at,
    )


def _string_field(body: bytes, name: str) -> str | None:
    """``body[name]`` when ``body`` is a JSON object and the value a short non-empty string."""
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    value = data.get(name) if isinstance(data, dict) else None
    return value if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS else None


def _error_code(body: bytes) -> str | None:
    """The error code from either RFC 6749's or Quota's error body, or None."""
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    err = data.get("error")
    if isinstance(err, str) and err:
        return err[:64]
    if isinstance(err, dict):
        code = err.get("code")
        if isinstance(code, str) and code:
            return code[:64]
    return None
