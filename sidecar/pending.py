"""The OAuth round-trip in flight, kept in the sidecar's own encrypted cookie.

Between ``/auth/quota/connect`` and ``/auth/quota/callback`` the sidecar remembers the ``state``,
the PKCE verifier, the redirect URI, who started it and where to go afterwards. It lives in an
aiohttp-session cookie encrypted with a key derived from ``SESSION_SECRET`` (Fernet), scoped to
``/auth/quota``, ``HttpOnly``, ``SameSite=Lax`` and ``Secure`` when the browser came over https
(``secure: auto``), so plain ``http://localhost`` development keeps its cookie (the recipe's
``state_mismatch`` pitfall).

Several round-trips may be pending at once (two tabs); each is keyed by its ``state`` and is
single-use: ``take`` removes it whatever happens next. An unreadable cookie is "no session".
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web
from aiohttp_session import Session
from aiohttp_session.cookie_storage import EncryptedCookieStorage

from sidecar.config import SessionConfig
from sidecar.forwarding.headers import Network, client_scheme

COOKIE_PATH = "/auth/quota"
MAX_PENDING = 4  # tabs connecting at once; the oldest is dropped beyond this
_KEY = "pending"


@dataclass(frozen=True, slots=True)
class Pending:
    state: str
    verifier: str
    redirect_uri: str
    user_key: str
    return_to: str
    started_at: float


class PendingCookieStorage(EncryptedCookieStorage):
    """aiohttp-session's encrypted cookie, with ``Secure`` decided per request."""

    def __init__(self, key: bytes, config: SessionConfig, trusted: tuple[Network, ...]) -> None:
        super().__init__(
            key,
            cookie_name=config.cookie_name,
            max_age=config.pending_ttl_s,
            path=COOKIE_PATH,
            httponly=True,
            samesite="Lax",
        )
        self._mode = config.secure
        self._trusted = trusted

    def secure_for(self, request: web.BaseRequest) -> bool:
        if self._mode == "auto":
            return client_scheme(request, self._trusted) == "https"
        return self._mode == "always"

    async def save_session(
        self, request: web.Request, response: web.StreamResponse, session: Session
    ) -> None:
        secure = self.secure_for(request)
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


PENDING_STORAGE = web.AppKey("pending_storage", PendingCookieStorage)


def remember(session: Session, pending: Pending) -> None:
    entries = [e for e in _entries(session) if e.get("state") != pending.state]
    entries = entries[-(MAX_PENDING - 1) :]
    entries.append(asdict(pending))
    session[_KEY] = entries


def take(session: Session, state: str | None) -> Pending | None:
    """Remove and return the pending round-trip for ``state`` (None if there is none)."""
    entries = _entries(session)
    found = None
    rest = []
    for entry in entries:
        if state is not None and entry.get("state") == state and found is None:
            found = entry
        else:
            rest.append(entry)
    if found is not None:
        if rest:
            session[_KEY] = rest
        else:
            session.invalidate()
    try:
        return Pending(**found) if found is not None else None
    except TypeError:
        return None


def is_expired(pending: Pending, ttl_s: float, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    return not (pending.started_at <= now < pending.started_at + ttl_s)


def _entries(session: Session) -> list[dict[str, Any]]:
    raw = session.get(_KEY)
    if not isinstance(raw, list):
        return []
    return [e for e in raw if isinstance(e, dict)]
