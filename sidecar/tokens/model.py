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
    """

    access_token: str
    refresh_token: str
    expires_at: float  # unix seconds
    scope: str  # space-separated scopes as granted (may be narrower than asked)
    obtained_at: float  # unix seconds of the token call that produced this pair
    version: int = 0

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(self.scope.split())

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
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, version: int) -> TokenRecord:
        return cls(
            access_token=str(data["access_token"]),
            refresh_token=str(data["refresh_token"]),
            expires_at=float(data["expires_at"]),
            scope=str(data.get("scope", "")),
            obtained_at=float(data.get("obtained_at", 0.0)),
            version=version,
        )

    def __repr__(self) -> str:  # tokens never reach a log through repr
        return (
            f"TokenRecord(expires_at={self.expires_at!r}, scope={self.scope!r}, "
            f"version={self.version!r}, access_token='***', refresh_token='***')"
        )
