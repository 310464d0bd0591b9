"""The token store contract: what every backend (memory, Redis) promises the refresh logic.

Records are addressed by ``user_key`` — an HMAC of the host app's user id (see
``sidecar.tokens.crypto.UserKeys``) — so no raw user id ever reaches a backend. Backends seal
records with the ``Sealer`` they are given, bound to the ``user_key``.

Every method raises ``sidecar.errors.StoreUnavailable`` when the backend cannot be reached; it
never deletes or changes anything on that path. A record that no longer opens (wrong key,
tampered, copied from another user) is treated as absent by ``get`` and logged.

Besides the records, a store keeps two small things for the refresh logic and for operators:

* Rotation marks (``remember_rotation`` / ``was_rotated``): for a short while after a refresh,
  the fingerprint of the refresh token it spent. A request that read the record just before the
  refresh landed asks first, and re-reads instead of sending a spent token to Quota::

      request A: get → v1 (refresh token r1)      request B: get → v1 (r1)
      request A: refresh with r1 → r2, CAS v1→v2, remember_rotation(r1)
                                                  request B: was_rotated(r1) → True: re-read v2

  Only a SHA-256 fingerprint of the token is kept (``rotation_fingerprint``), never the token.
* Re-sealing (``scan_user_keys``, ``seal_state``, ``reseal``) for key rotation, see
  ``sidecar.tokens.rotate``.
* An index from Quota's user id (the ``sub`` a record carries) to the user keys whose records
  carry it (``user_keys_for_quota_user``), for Quota's ``user.disconnected`` webhook. A ``put``
  indexes before it writes; the reader opens every candidate and returns only the records
  that really carry the id, so an entry left behind (a write that failed after indexing, a
  record that expired, a reconnect with another Quota account) is harmless. A stale entry is
  pruned only once it is older than ``INDEX_PRUNE_AFTER_S``, never one a write in flight may
  have just made::

      writer: index(q, k) ……………………………… write record k (q)
      reader:            lookup(q) → k; get k → old record (not q): skip it, keep the entry

* Webhook event ids claimed once (``claim_event``): ``SET NX`` with an expiry, so a replayed
  event is refused on every replica.
* Connects started by the host app's backend (``remember_connect`` / ``take_connect``): the
  pending state the browser has no cookie for, sealed, expiring, and taken once.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from sidecar.tokens.crypto import Sealer, SealError
from sidecar.tokens.model import TokenRecord

ROTATION_FINGERPRINT_CHARS = 32  # 128 bits of SHA-256: unique per token, reveals nothing
# An index entry younger than this may belong to a write still in flight: never pruned.
INDEX_PRUNE_AFTER_S = 60.0


def rotation_fingerprint(refresh_token: str) -> str:
    """What a store keeps of a spent refresh token: hex SHA-256, cut to 128 bits."""
    return fingerprint(refresh_token)


def fingerprint(value: str) -> str:
    """Hex SHA-256 of ``value``, cut to 128 bits: how ids and states appear in key names."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:ROTATION_FINGERPRINT_CHARS]


def connect_seal_label(state: str) -> str:
    """What a pending connect is sealed to (in place of a user key): its own state."""
    return f"connect-state:{fingerprint(state)}"


class SealState(enum.Enum):
    """Which key of the ring a stored record is sealed under, as key rotation sees it."""

    ABSENT = "absent"  # no record (never written, or deleted since it was listed)
    PRIMARY = "primary"  # sealed under the ring's first key: nothing to do
    OLDER_KEY = "older_key"  # opens under another key of the ring: ``reseal`` rewrites it
    UNREADABLE = "unreadable"  # opens under no key of the ring (old key dropped, or tampered)


def seal_state_of(sealer: Sealer, user_key: str, blob: bytes) -> SealState:
    """How ``blob``, stored for ``user_key``, stands against ``sealer``'s ring (for backends)."""
    try:
        sealer.open(user_key, blob)
    except SealError:
        return SealState.UNREADABLE
    if sealer.key_id_of(blob) == sealer.primary_key_id:
        return SealState.PRIMARY
    return SealState.OLDER_KEY


@runtime_checkable
class TokenStore(Protocol):
    """Compare-and-set storage for one record per user.

    Versions: every write of new tokens gives the record a new ``version`` that this user's key
    has never had before (not merely ``old + 1``: a delete followed by a put must not recreate
    an old version, or a refresh that started before a disconnect could write its tokens back).
    ``reseal`` is the one write that keeps the version: it stores the same tokens under another
    key, and a refresh in flight on another replica must still be able to compare-and-set
    against the version it read.
    """

    name: str

    async def get(self, user_key: str) -> TokenRecord | None:
        """The current record with its ``version``, or ``None``."""
        ...

    async def put(self, user_key: str, record: TokenRecord) -> TokenRecord:
        """Write unconditionally (a new connection). Returns the record with its new version."""
        ...

    async def compare_and_set(
        self, user_key: str, expected_version: int, record: TokenRecord
    ) -> TokenRecord | None:
        """Write only if the stored version is ``expected_version``.

        Returns the written record with its new version, or ``None`` when the record changed or
        is gone (nothing written).
        """
        ...

    async def delete(self, user_key: str) -> bool:
        """Delete whatever is stored. True if something was deleted."""
        ...

    async def compare_and_delete(self, user_key: str, expected_version: int) -> bool:
        """Delete only if the stored version is ``expected_version``. True if deleted."""
        ...

    async def remember_rotation(self, user_key: str, old_refresh_token: str, ttl_s: float) -> None:
        """Note for ``ttl_s`` seconds that ``old_refresh_token`` was spent by a refresh.

        Only its ``rotation_fingerprint`` is stored. ``ttl_s`` must be positive.
        """
        ...

    async def was_rotated(self, user_key: str, refresh_token: str) -> bool:
        """True if a refresh spent ``refresh_token`` within the ttl it was remembered for."""
        ...

    def scan_user_keys(self) -> AsyncIterator[str]:
        """Every ``user_key`` with a stored record, in no particular order.

        Safe while the store serves traffic. Like Redis's ``SCAN``, a user written or deleted
        during the scan may or may not appear, and one may appear twice: callers are idempotent.
        """
        ...

    async def seal_state(self, user_key: str) -> SealState:
        """Which key seals the stored record (it is opened to tell ``UNREADABLE`` apart)."""
        ...

    async def reseal(self, user_key: str) -> bool:
        """Re-seal the record under the primary key if it is sealed under another key.

        Written only if the version is unchanged since it was read, and the version is kept.
        True if rewritten; False if already under the primary key, absent, changed meanwhile,
        or unreadable (left as is, and logged).
        """
        ...

    async def user_keys_for_quota_user(self, quota_user_id: str) -> list[str]:
        """The user keys whose stored record carries ``quota_user_id``, verified, sorted."""
        ...

    async def claim_event(self, event_id: str, ttl_s: float) -> bool:
        """True the first time ``event_id`` is claimed within ``ttl_s`` seconds, else False."""
        ...

    async def release_event(self, event_id: str) -> None:
        """Forget a claim, so a delivery that failed after claiming can be retried."""
        ...

    async def remember_connect(self, state: str, payload: bytes, ttl_s: float) -> None:
        """Keep ``payload`` (sealed) under ``state`` for ``ttl_s`` seconds."""
        ...

    async def take_connect(self, state: str) -> bytes | None:
        """The payload kept under ``state``, removed in the same step; None if absent/expired."""
        ...

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the backend answers."""
        ...

    async def close(self) -> None: ...
