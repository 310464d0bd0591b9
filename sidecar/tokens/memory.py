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

Adding an ``await`` inside any method would break this; keep them synchronous inside. The same
holds for ``reseal``: it reads, re-seals and writes back in one step, so no compare-and-set can
land in between, and it keeps the version, so one that started before it still succeeds after.

Rotation marks live in a second dict, keyed by user and token fingerprint, each with a deadline
on ``clock`` (``time.monotonic`` unless a test passes its own); expired marks are dropped
whenever a new one is added, so the dict holds only the last ``ttl_s`` seconds of refreshes.
Claimed webhook events and pending connects expire the same way.

The Quota-user index is kept exact by every write and delete here (nothing interleaves), and
read with the same rules as Redis's: candidates verified, old stale entries pruned.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple

from sidecar.tokens.crypto import Sealer, SealError
from sidecar.tokens.model import TokenRecord
from sidecar.tokens.store import (
    INDEX_PRUNE_AFTER_S,
    SealState,
    connect_seal_label,
    fingerprint,
    rotation_fingerprint,
    seal_state_of,
)

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

    def __init__(self, sealer: Sealer, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._sealer = sealer
        self._clock = clock
        self._entries: dict[str, SealedEntry] = {}
        # (user_key, fingerprint of a spent refresh token) -> deadline on ``clock``
        self._rotated: dict[tuple[str, str], float] = {}
        # quota user id -> {user_key: indexed at, on ``clock``}; and each user's indexed id
        self._by_quota_user: dict[str, dict[str, float]] = {}
        self._quota_user_of: dict[str, str] = {}
        self._events: dict[str, float] = {}  # fingerprint of an event id -> deadline
        self._connects: dict[str, tuple[float, bytes]] = {}  # state fingerprint -> (deadline, blob)
        self._watchers: list[Callable[[str], None]] = []

    # Change notices for the record cache (``sidecar.tokens.cache.ChangeNotices``): every change
    # of a user's record is told at once, in the same step, so a copy never outlives it.

    @property
    def subscribed(self) -> bool:
        return True  # notices cannot be missed: they are calls in this process

    @property
    def generation(self) -> int:
        return 0

    def on_change(self, callback: Callable[[str], None]) -> None:
        self._watchers.append(callback)

    def _changed(self, user_key: str) -> None:
        for callback in self._watchers:
            callback(user_key)

    async def get(self, user_key: str) -> TokenRecord | None:
        return self._open(user_key)

    def _open(self, user_key: str) -> TokenRecord | None:
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
        self._unindex(user_key)
        self._changed(user_key)
        return self._entries.pop(user_key, None) is not None

    async def compare_and_delete(self, user_key: str, expected_version: int) -> bool:
        current = self._entries.get(user_key)
        if current is None or current.version != expected_version:
            return False
        del self._entries[user_key]
        self._unindex(user_key)
        self._changed(user_key)
        return True

    async def remember_rotation(self, user_key: str, old_refresh_token: str, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be a positive number of seconds")
        now = self._clock()
        self._rotated = {mark: until for mark, until in self._rotated.items() if until > now}
        self._rotated[(user_key, rotation_fingerprint(old_refresh_token))] = now + ttl_s

    async def was_rotated(self, user_key: str, refresh_token: str) -> bool:
        until = self._rotated.get((user_key, rotation_fingerprint(refresh_token)))
        return until is not None and until > self._clock()

    async def scan_user_keys(self) -> AsyncIterator[str]:
        for user_key in list(self._entries):  # a snapshot: callers may write while iterating
            yield user_key

    async def seal_state(self, user_key: str) -> SealState:
        entry = self._entries.get(user_key)
        if entry is None:
            return SealState.ABSENT
        return seal_state_of(self._sealer, user_key, entry.blob)

    async def reseal(self, user_key: str) -> bool:
        entry = self._entries.get(user_key)
        if entry is None:
            return False
        try:
            plaintext = self._sealer.open(user_key, entry.blob)
        except SealError as exc:
            logger.warning(
                "token record for user key %s… does not open, leaving it as is: %s",
                user_key[:12],
                exc,
            )
            return False
        if self._sealer.key_id_of(entry.blob) == self._sealer.primary_key_id:
            return False
        blob = self._sealer.seal(user_key, plaintext)
        self._entries[user_key] = SealedEntry(entry.version, blob)  # same version: see above
        return True

    async def user_keys_for_quota_user(self, quota_user_id: str) -> list[str]:
        entries = self._by_quota_user.get(quota_user_id, {})
        now = self._clock()
        found = []
        for user_key, indexed_at in list(entries.items()):
            record = self._open(user_key)
            if record is not None and record.quota_user_id == quota_user_id:
                found.append(user_key)
            elif now - indexed_at >= INDEX_PRUNE_AFTER_S:
                del entries[user_key]
        if not entries:
            self._by_quota_user.pop(quota_user_id, None)
        return sorted(found)

    async def claim_event(self, event_id: str, ttl_s: float) -> bool:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be a positive number of seconds")
        now = self._clock()
        self._events = {event: until for event, until in self._events.items() if until > now}
        key = fingerprint(event_id)
        if key in self._events:
            return False
        self._events[key] = now + ttl_s
        return True

    async def release_event(self, event_id: str) -> None:
        self._events.pop(fingerprint(event_id), None)

    async def remember_connect(self, state: str, payload: bytes, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be a positive number of seconds")
        now = self._clock()
        self._connects = {s: kept for s, kept in self._connects.items() if kept[0] > now}
        blob = self._sealer.seal(connect_seal_label(state), payload)
        self._connects[fingerprint(state)] = (now + ttl_s, blob)

    async def take_connect(self, state: str) -> bytes | None:
        kept = self._connects.pop(fingerprint(state), None)
        if kept is None or kept[0] <= self._clock():
            return None
        try:
            return self._sealer.open(connect_seal_label(state), kept[1])
        except SealError as exc:
            logger.warning("a pending connect does not open, treating it as absent: %s", exc)
            return None

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _write(self, user_key: str, record: TokenRecord, current: int | None) -> TokenRecord:
        version = new_version(current)
        self._entries[user_key] = SealedEntry(version, self._sealer.seal_record(user_key, record))
        if record.quota_user_id != self._quota_user_of.get(user_key):
            self._unindex(user_key)
        if record.quota_user_id is not None:
            self._quota_user_of[user_key] = record.quota_user_id
            self._by_quota_user.setdefault(record.quota_user_id, {})[user_key] = self._clock()
        self._changed(user_key)
        return record.with_version(version)

    def _unindex(self, user_key: str) -> None:
        quota_user_id = self._quota_user_of.pop(user_key, None)
        if quota_user_id is None:
            return
        entries = self._by_quota_user.get(quota_user_id, {})
        entries.pop(user_key, None)
        if not entries:
            self._by_quota_user.pop(quota_user_id, None)

    # Test hooks: the contract suite uses these to plant blobs the public API cannot produce
    # (a record copied from another user, a tampered blob). Not for application code.

    def sealed_entry(self, user_key: str) -> SealedEntry | None:
        """Test hook: the raw stored entry for ``user_key``, as Redis would hold it."""
        return self._entries.get(user_key)

    def plant_sealed_entry(self, user_key: str, entry: SealedEntry) -> None:
        """Test hook: store ``entry`` under ``user_key`` as is, without sealing anything."""
        self._entries[user_key] = entry
        self._changed(user_key)

    def rotation_marks(self, user_key: str) -> list[str]:
        """Test hook: the fingerprints of spent refresh tokens held for ``user_key``."""
        return [mark for user, mark in self._rotated if user == user_key]

    def index_entries(self, quota_user_id: str) -> dict[str, float]:
        """Test hook: the raw index entries for ``quota_user_id`` (user key -> indexed at)."""
        return dict(self._by_quota_user.get(quota_user_id, {}))

    def plant_index_entry(self, quota_user_id: str, user_key: str, age_s: float) -> None:
        """Test hook: an index entry made ``age_s`` ago, as a failed or outdated write leaves."""
        entries = self._by_quota_user.setdefault(quota_user_id, {})
        entries[user_key] = self._clock() - age_s
