"""An in-process token store: sealed records in a dict, for a single sidecar process.

Records are kept sealed, exactly as Redis would hold them, so a memory dump or a debugger shows
no tokens and the tests of sealing cover both backends alike. Nothing survives a restart, and two
processes do not share it: the app warns at start when this backend is chosen.

Atomicity: no method awaits anything, so under asyncio each one runs from start to end without
another task interleaving. That is what makes ``compare_and_set`` a real compare-and-set here::

    task A: get()          -> v1
    task B: get()          -> v1
    task A: cas(v1, new)   -> v2  (read + write happen in one step, no await in between)
    task B: cas(v1, new)   -> None (sees v2 != v1; nothing written)

Adding an ``await`` inside any method would break this; keep them synchronous inside.
"""

from __future__ import annotations

import logging
import secrets
from typing import NamedTuple

from sidecar.tokens.crypto import Sealer, SealError
from sidecar.tokens.model import TokenRecord

logger = logging.getLogger(__name__)

_VERSION_BITS = 63  # fits a signed 64-bit integer everywhere a version may travel


class SealedEntry(NamedTuple):
    """One stored record: its version and its sealed payload."""

    version: int
    blob: bytes


def new_version(current: int | None) -> int:
    """A random non-zero version different from ``current``.

    Random rather than counted, so a delete followed by a put cannot bring back a version an
    earlier record had (63 random bits: a repeat is not a practical concern).
    """
    while True:
        version = secrets.randbits(_VERSION_BITS)
        if version != 0 and version != current:
            return version


class MemoryTokenStore:
    """``TokenStore`` held in this process's memory."""

    name = "memory"

    def __init__(self, sealer: Sealer) -> None:
        self._sealer = sealer
        self._entries: dict[str, SealedEntry] = {}

    async def get(self, user_key: str) -> TokenRecord | None:
        entry = self._entries.get(user_key)
        if entry is None:
            return None
        try:
            return self._sealer.open_record(user_key, entry.blob, version=entry.version)
        except SealError as exc:
            logger.warning(
                "token record for user key %s… does not open, treating it as absent: %s",
                user_key[:12],
                exc,
            )
            return None

    async def put(self, user_key: str, record: TokenRecord) -> TokenRecord:
        current = self._entries.get(user_key)
        return self._write(user_key, record, current.version if current else None)

    async def compare_and_set(
        self, user_key: str, expected_version: int, record: TokenRecord
    ) -> TokenRecord | None:
        current = self._entries.get(user_key)
        if current is None or current.version != expected_version:
            return None
        return self._write(user_key, record, current.version)

    async def delete(self, user_key: str) -> bool:
        return self._entries.pop(user_key, None) is not None

    async def compare_and_delete(self, user_key: str, expected_version: int) -> bool:
        current = self._entries.get(user_key)
        if current is None or current.version != expected_version:
            return False
        del self._entries[user_key]
        return True

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _write(self, user_key: str, record: TokenRecord, current: int | None) -> TokenRecord:
        version = new_version(current)
        self._entries[user_key] = SealedEntry(version, self._sealer.seal_record(user_key, record))
        return record.with_version(version)

    # Test hooks: the contract suite uses these to plant blobs the public API cannot produce
    # (a record copied from another user, a tampered blob). Not for application code.

    def sealed_entry(self, user_key: str) -> SealedEntry | None:
        """Test hook: the raw stored entry for ``user_key``, as Redis would hold it."""
        return self._entries.get(user_key)

    def plant_sealed_entry(self, user_key: str, entry: SealedEntry) -> None:
        """Test hook: store ``entry`` under ``user_key`` as is, without sealing anything."""
        self._entries[user_key] = entry
