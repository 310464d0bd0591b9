"""OAuth clients (apps) registered with the emulator, and the rules their redirect URIs follow."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from .scopes import parse_scope

# Hosts where plain http is allowed, as Quota allows for development (doc).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def new_id(prefix: str, nbytes: int = 18) -> str:
    return f"{prefix}{secrets.token_urlsafe(nbytes)}"


@dataclass(frozen=True)
class Client:
    """One registered app. ``public`` clients authenticate with PKCE alone (method ``none``)."""

    client_id: str
    client_secret: str
    name: str
    redirect_uris: tuple[str, ...]
    allowed_scopes: tuple[str, ...]
    created_at: float
    app_id: str = field(default_factory=lambda: new_id("app_", 9))
    owner_email: str | None = None
    public: bool = False

    def secret_matches(self, secret: str | None) -> bool:
        if secret is None:
            return self.public
        return hmac.compare_digest(secret.encode(), self.client_secret.encode())

    def has_redirect_uri(self, uri: str) -> bool:
        """Byte-for-byte equality with one registered URI: no normalisation, no prefixes."""
        return uri in self.redirect_uris

    def unknown_scopes(self, scope: str) -> list[str]:
        return [s for s in parse_scope(scope) if s not in self.allowed_scopes]

    def to_json(self, *, with_secret: bool) -> dict[str, object]:
        body: dict[str, object] = {
            "id": self.app_id,
            "name": self.name,
            "client_id": self.client_id,
            "redirect_uris": list(self.redirect_uris),
            "allowed_scopes": list(self.allowed_scopes),
            "created_at": int(self.created_at),
        }
        if with_secret:
            body["client_secret"] = self.client_secret
        return body


def is_absolute_http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


def redirect_uri_problem(uri: object) -> str | None:
    """Why ``uri`` cannot be registered, or ``None`` when it can."""
    if not isinstance(uri, str) or not uri:
        return "a redirect URI must be a non-empty string"
    try:
        parts = urlsplit(uri)
        host = parts.hostname
    except ValueError:
        return f"{uri!r} is not a valid URL"
    if parts.scheme not in ("http", "https") or not host:
        return f"{uri!r} must be an absolute http(s) URL"
    if parts.fragment or "#" in uri:
        return f"{uri!r} must not contain a fragment"
    if parts.scheme == "http" and host not in LOOPBACK_HOSTS:
        return f"{uri!r} must use https (plain http is allowed only for localhost and 127.0.0.1)"
    return None


def append_query(uri: str, query: Mapping[str, str | None]) -> str:
    """``uri`` with ``query`` added to the query it already has, before any fragment."""
    base, hash_sign, fragment = uri.partition("#")
    encoded = urlencode({k: v for k, v in query.items() if v is not None})
    separator = "" if base.endswith(("?", "&")) else ("&" if "?" in base else "?")
    return f"{base}{separator}{encoded}{hash_sign}{fragment}"
