"""Opened token records kept in the process between calls, dropped on every change notice.

With the Redis store every billed call would read and open the user's record (an ``HMGET`` and an
AES-GCM open). A record good for the next minutes is kept here instead, and dropped when any
replica changes it: every write script publishes on the user's change channel (see
``redis_store``), and the refresh coordinator's subscription hands each notice to ``drop``.

A copy is trusted only while that subscription is up and has not restarted since the copy was
made (a notice can be missed while it is down), for at most ``ttl_s``, and never into the last
``tokens.refresh_wait_skew_s`` before the token expires, where callers wait for its refresh.
Inside the refresh window before that, the copy still serves while the token manager refreshes
in the background; the refresh's write drops it.

The memory store is its own source of notices (``MemoryTokenStore.on_change``): every write
drops the copy at once, and copies save it the AES-GCM open and the JSON of every call. The race between a read and a notice::

    replica A                               Redis                      replica B
    mark = cache.mark()
    HMGET → old record ─────────────────────  (old)
                                              write + PUBLISH ◄──────── disconnect
    notice arrives: drop(user), changes += 1
    remember(user, old, mark) → refused: a notice came after the mark

So a copy made from a read that a notice may have overtaken is never kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sidecar.tokens.model import TokenRecord

MAX_ENTRIES = 100_000  # about 0.5 KB each; the oldest go first past this


class ChangeNotices(Protocol):
    """Where change notices come from (``RedisRefreshCoordinator``, ``MemoryTokenStore``)."""

    @property
    def subscribed(self) -> bool: ...

    @property
    def generation(self) -> int: ...

    def on_change(self, callback: Callable[[str], None]) -> None: ...


@dataclass(frozen=True, slots=True)
class _Entry:
    record: TokenRecord
    until: float  # clock time past which the copy is not used
    generation: int


class RecordCache:
    def __init__(
        self,
        notices: ChangeNotices,
        *,
        ttl_s: float,
        wait_skew_s: float,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._notices = notices
        self._ttl_s = ttl_s
        self._skew_s = wait_skew_s
        self._max = max_entries
        self._entries: dict[str, _Entry] = {}
        self._changes = 0  # every drop, any user: a mark older than a drop is refused
        notices.on_change(self.drop)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def active(self) -> bool:
        """Whether copies are trusted now: change notices are arriving."""
        return self._notices.subscribed

    def get(self, user_key: str, now: float) -> TokenRecord | None:
        entry = self._entries.get(user_key)
        if entry is None:
            return None
        if (
            now >= entry.until
            or entry.generation != self._notices.generation
            or not self._notices.subscribed
        ):
            del self._entries[user_key]
            return None
        return entry.record

    def mark(self) -> int:
        """Take before reading the store; pass to ``remember``."""
        return self._changes

    def remember(self, user_key: str, record: TokenRecord, mark: int, now: float) -> None:
        """Keep ``record``, read after ``mark`` was taken, unless a notice came since."""
        if mark != self._changes or not self._notices.subscribed:
            return
        until = min(now + self._ttl_s, record.expires_at - self._skew_s)
        if until <= now:
            return
        if user_key not in self._entries and len(self._entries) >= self._max:
            del self._entries[next(iter(self._entries))]
        self._entries[user_key] = _Entry(record, until, self._notices.generation)

    def drop(self, user_key: str) -> None:
        self._changes += 1
        self._entries.pop(user_key, None)
