"""Authorization codes, grants and the tokens they produce: issue, exchange, rotate, revoke.

A *grant* is one user's consent to one client. Every code exchange starts a grant; every token
derived from it (the first pair and each rotated pair) belongs to it, so revoking the grant
stops all of them at once. The rules, each from RFC 6749 / OAuth 2.1 or Quota's docs:

- A code is single-use. Its first presentation by its own client burns it, whether or not the
  exchange succeeds (a client must never retry an exchange). A second presentation answers
  ``invalid_grant`` and revokes the grant the first one produced (RFC 6749 §4.1.2).
- Refresh tokens rotate. Each refresh marks the presented token *rotated* and returns a new
  pair; access tokens already issued stay valid until their own expiry. A rotated token that
  comes back means two parties hold it, so the whole grant is revoked:

      t0  replica A refreshes with R1 -> gets A2/R2; R1 is now rotated
      t1  replica B refreshes with R1 -> invalid_grant; grant revoked; A2 and R2 stop working

- Revoking an access token stops only that token; revoking a refresh token stops the grant.
- A user disconnecting apps in Quota's dashboard stops every grant they hold, for every client.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .clients import new_id
from .errors import ApiError, OAuthError, RefreshTokenReused
from .scopes import format_scope, parse_scope
from .wallets import user_id_for

# RFC 7636 §4.1: 43-128 characters from the unreserved set.
_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")


def s256_challenge(verifier: str) -> str:
    """``base64url(sha256(verifier))`` without padding (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass
class AuthCode:
    code: str
    client_id: str
    email: str
    scope: str
    redirect_uri: str
    code_challenge: str
    expires_at: float
    used: bool = False
    grant_id: str | None = None


@dataclass
class Grant:
    grant_id: str
    client_id: str
    email: str
    created_at: float
    revoked: bool = False


@dataclass
class AccessToken:
    token: str
    grant_id: str
    scope: str
    expires_at: float
    revoked: bool = False


@dataclass
class RefreshToken:
    token: str
    grant_id: str
    scope: str
    rotated: bool = False


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int
    scope: str

    def to_json(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "refresh_token": self.refresh_token,
            "scope": self.scope,
        }


@dataclass(frozen=True)
class Bearer:
    """What a valid access token lets its holder do, and for whom."""

    token: str
    client_id: str
    email: str
    scopes: tuple[str, ...]

    @property
    def user_id(self) -> str:
        return user_id_for(self.email)


def _invalid_token(message: str) -> ApiError:
    return ApiError(
        401,
        "invalid_token",
        message,
        headers={"WWW-Authenticate": 'Bearer realm="quota", error="invalid_token"'},
    )


class GrantBook:
    """Every code, grant and token the emulator has issued, with the clock that expires them."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.codes: dict[str, AuthCode] = {}
        self.grants: dict[str, Grant] = {}
        self.access_tokens: dict[str, AccessToken] = {}
        self.refresh_tokens: dict[str, RefreshToken] = {}

    def create_code(
        self,
        *,
        client_id: str,
        email: str,
        scope: str,
        redirect_uri: str,
        code_challenge: str,
        ttl_s: float,
    ) -> str:
        code = new_id("quota_code_", 24)
        self.codes[code] = AuthCode(
            code=code,
            client_id=client_id,
            email=email,
            scope=scope,
            redirect_uri=redirect_uri,
            code_challenge=code_challenge,
            expires_at=self._clock() + ttl_s,
        )
        return code

    def start_grant(self, client_id: str, email: str, scope: str, access_ttl_s: float) -> TokenPair:
        grant = Grant(new_id("grant_", 12), client_id, email, self._clock())
        self.grants[grant.grant_id] = grant
        return self._issue_pair(grant, scope, access_ttl_s)

    def exchange_code(
        self,
        *,
        client_id: str,
        code: str,
        redirect_uri: str,
        code_verifier: str,
        access_ttl_s: float,
    ) -> TokenPair:
        record = self.codes.get(code)
        if record is None:
            raise OAuthError("invalid_grant", "Unknown authorization code.")
        if record.used:
            if record.grant_id is not None:
                self.revoke_grant(record.grant_id)
            raise OAuthError(
                "invalid_grant",
                "This authorization code was already used; tokens issued from it are revoked.",
            )
        if record.client_id != client_id:
            raise OAuthError("invalid_grant", "This code was issued to another client.")
        record.used = True
        if self._clock() >= record.expires_at:
            raise OAuthError("invalid_grant", "The authorization code has expired.")
        if redirect_uri != record.redirect_uri:
            raise OAuthError(
                "invalid_grant", "redirect_uri differs from the one used at authorization."
            )
        if not _VERIFIER.fullmatch(code_verifier) or not hmac.compare_digest(
            s256_challenge(code_verifier), record.code_challenge
        ):
            raise OAuthError("invalid_grant", "code_verifier does not match the code_challenge.")
        pair = self.start_grant(client_id, record.email, record.scope, access_ttl_s)
        record.grant_id = self.access_tokens[pair.access_token].grant_id
        return pair

    def refresh(
        self, *, client_id: str, refresh_token: str, scope: str | None, access_ttl_s: float
    ) -> TokenPair:
        record = self.refresh_tokens.get(refresh_token)
        if record is None:
            raise OAuthError("invalid_grant", "Unknown refresh token.")
        grant = self.grants[record.grant_id]
        if grant.client_id != client_id:
            raise OAuthError("invalid_grant", "This refresh token was issued to another client.")
        if grant.revoked:
            raise OAuthError("invalid_grant", "This refresh token has been revoked.")
        if record.rotated:
            self.revoke_grant(grant.grant_id)
            raise RefreshTokenReused()
        granted = record.scope
        if scope is not None:
            extra = [s for s in parse_scope(scope) if s not in parse_scope(record.scope)]
            if extra:
                raise OAuthError(
                    "invalid_scope", f"Scopes not in the original grant: {format_scope(extra)}."
                )
            granted = format_scope(parse_scope(scope))
        record.rotated = True
        return self._issue_pair(grant, granted, access_ttl_s)

    def revoke(self, token: str, client_id: str) -> Grant | None:
        """RFC 7009: stop ``token`` if it is ``client_id``'s; unknown tokens are ignored.

        Returns the grant this call revoked (a live grant's refresh token was presented), so the
        caller can announce the disconnection; ``None`` otherwise.
        """
        access = self.access_tokens.get(token)
        if access is not None and self.grants[access.grant_id].client_id == client_id:
            access.revoked = True
            return None
        refresh = self.refresh_tokens.get(token)
        if refresh is not None and self.grants[refresh.grant_id].client_id == client_id:
            grant = self.grants[refresh.grant_id]
            if not grant.revoked:
                self.revoke_grant(grant.grant_id)
                return grant
        return None

    def revoke_grant(self, grant_id: str) -> None:
        self.grants[grant_id].revoked = True

    def grant_of(self, access_token: str) -> Grant:
        """The grant an issued access token belongs to, live or not; ``KeyError`` if unknown."""
        return self.grants[self.access_tokens[access_token].grant_id]

    def has_live_grant(self, user_id: str, client_id: str) -> bool:
        """Whether ``user_id`` still has a grant with ``client_id`` that is not revoked."""
        return any(
            not g.revoked and g.client_id == client_id and user_id_for(g.email) == user_id
            for g in self.grants.values()
        )

    def knows_user(self, user_id: str) -> bool:
        """Whether any grant, live or not, was ever issued to ``user_id``."""
        return any(user_id_for(g.email) == user_id for g in self.grants.values())

    def revoke_user(self, user_id: str) -> list[Grant]:
        """Stop every live grant of ``user_id``, whatever the client; the grants stopped."""
        stopped = [
            g for g in self.grants.values() if not g.revoked and user_id_for(g.email) == user_id
        ]
        for grant in stopped:
            self.revoke_grant(grant.grant_id)
        return stopped

    def authenticate(self, token: str) -> Bearer:
        """The bearer behind a live access token; ``ApiError`` 401 ``invalid_token`` otherwise."""
        record = self.access_tokens.get(token)
        if record is None:
            raise _invalid_token("The access token is not recognised.")
        grant = self.grants[record.grant_id]
        if record.revoked or grant.revoked:
            raise _invalid_token("The access token has been revoked.")
        if self._clock() >= record.expires_at:
            raise _invalid_token("The access token has expired.")
        return Bearer(token, grant.client_id, grant.email, parse_scope(record.scope))

    def _issue_pair(self, grant: Grant, scope: str, access_ttl_s: float) -> TokenPair:
        access = AccessToken(
            new_id("quota_token_", 24), grant.grant_id, scope, self._clock() + access_ttl_s
        )
        refresh = RefreshToken(new_id("quota_refresh_", 24), grant.grant_id, scope)
        self.access_tokens[access.token] = access
        self.refresh_tokens[refresh.token] = refresh
        return TokenPair(access.token, refresh.token, max(1, int(access_ttl_s)), scope)
