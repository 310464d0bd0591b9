"""The OAuth round-trips in flight, each in its own encrypted cookie.

Between ``/auth/quota/connect`` and ``/auth/quota/callback`` the sidecar remembers the ``state``,
the PKCE verifier, the redirect URI, who started it and where to go afterwards. Each round-trip
lives in its own aiohttp-session cookie, ``<cookie_name>-<first 16 hex of state>``, encrypted
with a key derived from ``SESSION_SECRET`` (Fernet), scoped to ``/auth/quota``, ``HttpOnly``,
``SameSite=Lax`` and ``Secure`` when the browser came over https (``secure: auto``), so plain
``http://localhost`` development keeps its cookie (the recipe's ``state_mismatch`` pitfall).

One cookie per round-trip, not one shared cookie, because two tabs that click Connect at the
same instant would otherwise each write the cookie from the request they saw, and the last
response would erase the other tab's state. Each cookie is single-use: the callback deletes it
whatever the outcome. An unreadable or tampered cookie is "no round-trip" (aiohttp-session).

A connect the host app's *backend* starts (``GET /auth/quota/connect-url`` on the internal
listener) has no browser to hold a cookie yet: its round-trip is kept server-side instead, in the
token store, sealed, under its state, for ``pending_ttl_s``, and taken (read and deleted in one
step) by the first callback that names it (``remember_server_side`` / ``take_server_side``).
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import asdict, dataclass, fields

from aiohttp import web
from aiohttp_session import Session
from aiohttp_session.cookie_storage import EncryptedCookieStorage
from cryptography.fernet import Fernet

from sidecar.config import SessionConfig
from sidecar.forwarding.headers import Network, client_scheme
from sidecar.tokens.store import TokenStore

log = logging.getLogger(__name__)

COOKIE_PATH = "/auth/quota"
MAX_PENDING = 4  # round-trips one browser may have open; the oldest go beyond this
_KEY = "pending"
_STATE_CHARS = 16
_MAX_STATE_CHARS = 128  # the sidecar's states are 64 hex characters


@dataclass(frozen=True, slots=True)
class Pending:
    state: str
    verifier: str
    redirect_uri: str
    user_key: str
    return_to: str
    started_at: float


class _Cookie(EncryptedCookieStorage):
    """aiohttp-session's encrypted cookie under one name, with ``Secure`` decided per request."""

    def __init__(self, fernet: Fernet, name: str, owner: PendingCookies) -> None:
        super().__init__(
            fernet,
            cookie_name=name,
            max_age=owner.ttl_s,
            path=COOKIE_PATH,
            httponly=True,
            samesite="Lax",
        )
        self._owner = owner

    async def save_session(
        self, request: web.Request, response: web.StreamResponse, session: Session
    ) -> None:
        secure = self._owner.secure_for(request)
        if session.empty:
            response.del_cookie(
                self.cookie_name, path=COOKIE_PATH, secure=secure, httponly=True, samesite="Lax"
            )
            return
        data = self._encoder(self._get_session_data(session)).encode("utf-8")
        response.set_cookie(
            self.cookie_name,
            self._fernet.encrypt(data).decode("utf-8"),
            max_age=self.max_age,
            path=COOKIE_PATH,
            secure=secure,
            httponly=True,
            samesite="Lax",
        )


class PendingCookies:
    """Remembers and takes back pending round-trips, one cookie each."""

    def __init__(self, key: bytes, config: SessionConfig, trusted: tuple[Network, ...]) -> None:
        self._fernet = Fernet(base64.urlsafe_b64encode(key))
        self.prefix = config.cookie_name
        self.ttl_s = config.pending_ttl_s
        self._mode = config.secure
        self._trusted = trusted

    def secure_for(self, request: web.BaseRequest) -> bool:
        if self._mode == "auto":
            return client_scheme(request, self._trusted) == "https"
        return self._mode == "always"

    def cookie_name(self, state: str) -> str:
        return f"{self.prefix}-{state[:_STATE_CHARS]}"

    def _cookie(self, name: str) -> _Cookie:
        return _Cookie(self._fernet, name, self)

    async def remember(
        self, request: web.Request, response: web.StreamResponse, pending: Pending
    ) -> None:
        cookie = self._cookie(self.cookie_name(pending.state))
        session = await cookie.new_session()
        session[_KEY] = asdict(pending)
        await cookie.save_session(request, response, session)
        await self._drop_oldest(request, response, keep=MAX_PENDING - 1)

    async def take(
        self, request: web.Request, response: web.StreamResponse, state: str | None
    ) -> Pending | None:
        """The round-trip for ``state``, removed from the browser (None if there is none)."""
        if not state or len(state) < _STATE_CHARS:
            return None
        cookie = self._cookie(self.cookie_name(state))
        if cookie.cookie_name not in request.cookies:
            return None
        session = await cookie.load_session(request)
        found = _pending_for(session, state)
        session.invalidate()
        await cookie.save_session(request, response, session)  # single use: always deleted
        return found

    async def _drop_oldest(
        self, request: web.Request, response: web.StreamResponse, *, keep: int
    ) -> None:
        others: list[tuple[float, _Cookie]] = []
        for name in request.cookies:
            if name.startswith(f"{self.prefix}-"):
                cookie = self._cookie(name)
                entry = (await cookie.load_session(request)).get(_KEY)
                started = entry.get("started_at", 0.0) if isinstance(entry, dict) else 0.0
                others.append((float(started), cookie))
        others.sort(key=lambda item: item[0])
        for _, cookie in others[: max(0, len(others) - keep)]:
            empty = await cookie.new_session()
            await cookie.save_session(request, response, empty)


def _pending_for(session: Session, state: str) -> Pending | None:
    entry = session.get(_KEY)
    if not isinstance(entry, dict) or entry.get("state") != state:
        return None
    try:
        return Pending(**entry)
    except TypeError:
        return None


async def remember_server_side(store: TokenStore, pending: Pending, ttl_s: float) -> None:
    """Keep a backend-started round-trip in the store until its callback (or ``ttl_s``)."""
    payload = json.dumps(asdict(pending), separators=(",", ":")).encode("utf-8")
    await store.remember_connect(pending.state, payload, ttl_s)


async def take_server_side(store: TokenStore, state: str | None) -> Pending | None:
    """The backend-started round-trip for ``state``, removed from the store (single use)."""
    if not state or len(state) < _STATE_CHARS or len(state) > _MAX_STATE_CHARS:
        return None
    payload = await store.take_connect(state)
    if payload is None:
        return None
    try:
        entry = json.loads(payload)
        found = Pending(**{f.name: entry[f.name] for f in fields(Pending)})
    except (ValueError, KeyError, TypeError):
        log.warning("a server-side pending connect is not readable; ignoring it")
        return None
    return found if found.state == state else None


def is_expired(pending: Pending, ttl_s: float, now: float) -> bool:
    return not (pending.started_at <= now < pending.started_at + ttl_s)


PENDING_COOKIES = web.AppKey("pending_cookies", PendingCookies)
