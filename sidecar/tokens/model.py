"""The token record the sidecar keeps for each connected user."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """One user's Quota grant.

    ``version`` is owned by the store: it is an opaque generation number that changes on every
    write and is never reused for a user (so a compare-and-set made against an old record fails
    even after a disconnect and a new connect). Callers read it and pass it back; they never
    invent one. A record not yet written has ``version == 0``.

    Beside the tokens, the record carries who it belongs to and how it stands, sealed with them:
    the host app's user id (user keys are one-way, and forwarded events must name the user), the
    Quota user id (``sub``; the index for Quota's webhooks), and the connection's status. Records
    sealed before these fields existed open with their defaults.
    """

    access_token: str
    refresh_token: str
    expires_at: float  # unix seconds
    scope: str  # space-separated scopes as granted (may be narrower than asked)
    obtained_at: float  # unix seconds of the token call that produced this pair
    user_id: str | None = None  # the host app's id for the user, as the app named them
    quota_user_id: str | None = None  # Quota's ``sub``; None when Quota did not tell us
    # Quota refused a call for a scope this grant lacks (403 insufficient_scope): a refresh
    # cannot fix that, only a new connect, which writes a record without it.
    needs_reconnect: bool = False
    missing_scope: str = ""  # space-separated scopes Quota asked for; "" if none
    # How the last refresh ended: "ok" or "transient" ("invalid_grant" deletes the record).
    last_refresh_outcome: str | None = None
    last_refresh_at: float | None = None  # unix seconds
    version: int = 0

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(self.scope.split())

    @property
    def missing_scopes(self) -> tuple[str, ...]:
        return tuple(self.missing_scope.split())

    def expires_within(self, now: float, skew_s: float) -> bool:
        return self.expires_at - now < skew_s

    def is_valid_at(self, now: float) -> bool:
        return now < self.expires_at

    def with_version(self, version: int) -> TokenRecord:
        return dataclasses.replace(self, version=version)

    def to_json(self) -> dict[str, Any]:
        """The sealed payload. ``version`` is stored beside it, not inside it."""
        return {
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "expires_at": self.expires_at,
            "scope": self.scope,
            "obtained_at": self.obtained_at,
            "user_id": self.user_id,
            "quota_user_id": self.quota_user_id,
            "needs_reconnect": self.needs_reconnect,
            "missing_scope": self.missing_scope,
            "last_refresh_outcome": self.last_refresh_outcome,
            "last_refresh_at": self.last_refresh_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, version: int) -> TokenRecord:
        return cls(
            access_token=str(data["access_token"]),
            refresh_token=str(data["refresh_token"]),
            expires_at=float(data["expires_at"]),
            scope=str(data.get("scope", "")),
            obtained_at=float(data.get("obtained_at", 0.0)),
            user_id=_optional_str(data.get("user_id")),
            quota_user_id=_optional_str(data.get("quota_user_id")),
            needs_reconnect=data.get("needs_reconnect") is True,
            missing_scope=str(data.get("missing_scope") or ""),
            last_refresh_outcome=_optional_str(data.get("last_refresh_outcome")),
            last_refresh_at=_optional_float(data.get("last_refresh_at")),
            version=version,
        )

    def __repr__(self) -> str:  # tokens never reach a log through repr
        return (
            f"TokenRecord(expires_at={self.expires_at!r}, scope={self.scope!r}, "
            f"needs_reconnect={self.needs_reconnect!r}, version={self.version!r}, "
            "access_token='***', refresh_token='***')"
        )


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _optional_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
