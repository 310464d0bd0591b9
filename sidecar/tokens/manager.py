"""Hands out fresh access tokens: refresh before expiry, once per expiry, and never lose a grant.

Single flight, level one (this module): within a process, one refresh task per user; every
concurrent caller awaits the same task through ``asyncio.shield``, so a caller that goes away
cancels only its own wait, never the token call (cancelling it after Quota rotated the refresh
token would lose the only valid one).

Level two (across replicas) is a ``RefreshCoordinator``: the refresh runs while holding it, and
re-reads the record first, because another replica may have refreshed meanwhile::

    replica A                       replica B
    get → expiring (v1)             get → expiring (v1)
    hold(user) ✓                    hold(user) … waits
    re-read v1, refresh → v2
    CAS(v1 → v2) ✓, release
                                    hold(user) ✓
                                    re-read → v2, fresh: no token call

Writes are compare-and-set on the version read under the lock, so a disconnect (delete) that
lands while the token call is in flight wins: the CAS fails and the new tokens are revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from sidecar.errors import (
    QuotaUnavailable,
    RefreshUnavailable,
    StoreUnavailable,
    WalletNotConnected,
)
from sidecar.metrics import Metrics
from sidecar.oauth import QuotaClient, QuotaOAuthError
from sidecar.tokens.model import TokenRecord
from sidecar.tokens.store import TokenStore

log = logging.getLogger(__name__)

# How long a rotated refresh token is remembered, so a request that raced in late re-reads
# instead of presenting the spent token to Quota.
GRACE_S = 60.0


class RefreshCoordinator(Protocol):
    """Mutual exclusion for one user's refresh across every replica sharing the store."""

    def hold(self, user_key: str) -> contextlib.AbstractAsyncContextManager[None]: ...


class LocalCoordinator:
    """One process is the only replica (memory store): the in-process single flight suffices."""

    @contextlib.asynccontextmanager
    async def hold(self, user_key: str) -> AsyncIterator[None]:
        yield


class TokenManager:
    def __init__(
        self,
        store: TokenStore,
        quota: QuotaClient,
        *,
        refresh_skew_s: float,
        clock: Callable[[], float] = time.time,
        coordinator: RefreshCoordinator | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self._metrics = metrics or Metrics(process=False)
        self._quota = quota
        self._skew = refresh_skew_s
        self._clock = clock
        self._coordinator = coordinator or LocalCoordinator()
        self._inflight: dict[str, asyncio.Task[TokenRecord]] = {}

    async def current(self, user_key: str) -> TokenRecord | None:
        """The stored record as it is, without refreshing (for status pages)."""
        return await self.store.get(user_key)

    async def fresh(self, user_key: str) -> TokenRecord:
        """A record whose access token is good for at least ``refresh_skew_s`` more seconds."""
        record = await self.store.get(user_key)
        if record is None:
            raise WalletNotConnected
        if not record.expires_within(self._clock(), self._skew):
            return record
        return await self._single_flight(user_key, stale_version=None)

    async def after_rejection(self, user_key: str, rejected: TokenRecord) -> TokenRecord:
        """Quota refused ``rejected``'s access token (401): refresh even if it looks unexpired."""
        return await self._single_flight(user_key, stale_version=rejected.version)

    async def connect(self, user_key: str, record: TokenRecord) -> TokenRecord:
        """Store a new grant, replacing any earlier one (whose refresh token is then revoked)."""
        previous = await self.store.get(user_key)
        written = await self.store.put(user_key, record)
        self._metrics.wallets_connected.inc()
        if previous is not None and previous.refresh_token != record.refresh_token:
            await self._revoke_quietly(previous.refresh_token, reason="replaced by a new connect")
        return written

    async def disconnect(self, user_key: str) -> bool:
        """Forget the user's tokens, then revoke them at Quota; a failed revoke keeps nothing."""
        record = await self.store.get(user_key)
        if record is None:
            return False
        await self.store.delete(user_key)
        self._metrics.wallets_disconnected.labels("user").inc()
        await self._revoke_quietly(record.refresh_token, reason="disconnect")
        return True

    async def revoke_orphan(self, record: TokenRecord) -> None:
        """Revoke a grant that could not be stored, so it does not linger at Quota."""
        await self._revoke_quietly(record.refresh_token, reason="could not be stored")

    async def _single_flight(self, user_key: str, *, stale_version: int | None) -> TokenRecord:
        task = self._inflight.get(user_key)
        if task is None:
            task = asyncio.create_task(self._refresh(user_key, stale_version))
            self._inflight[user_key] = task
            task.add_done_callback(lambda t: self._finished(user_key, t))
        return await asyncio.shield(task)

    def _finished(self, user_key: str, task: asyncio.Task[TokenRecord]) -> None:
        if self._inflight.get(user_key) is task:
            del self._inflight[user_key]
        if not task.cancelled():
            task.exception()  # mark retrieved: every waiter may have gone away

    async def _refresh(self, user_key: str, stale_version: int | None) -> TokenRecord:
        async with self._coordinator.hold(user_key):
            record = await self.store.get(user_key)
            if record is None:
                raise WalletNotConnected
            if stale_version is None:
                if not record.expires_within(self._clock(), self._skew):
                    self._metrics.refreshed("already_fresh")
                    return record  # refreshed by another replica while we waited
            elif record.version != stale_version:
                self._metrics.refreshed("already_fresh")
                return record  # the rejected token was already replaced
            return await self._rotate(user_key, record)

    async def _rotate(self, user_key: str, record: TokenRecord) -> TokenRecord:
        if await self.store.was_rotated(user_key, record.refresh_token):
            # This refresh token was spent moments ago (grace record), yet it is what we read:
            # use the pair that replaced it rather than present a spent token to Quota.
            current = await self.store.get(user_key)
            if current is not None and current.refresh_token != record.refresh_token:
                log.info("refresh skipped: the token was already rotated (grace record)")
                self._metrics.refreshed("grace_hit")
                return current
            self._metrics.refreshed("transient")
            raise RefreshUnavailable(detail="refresh token already rotated; new record not visible")
        try:
            fresh = await self._quota.refresh(record.refresh_token)
        except QuotaOAuthError as exc:
            if exc.grant_ended:
                self._metrics.refreshed("invalid_grant")
                deleted = await self.store.compare_and_delete(user_key, record.version)
                if deleted:
                    self._metrics.wallets_disconnected.labels("grant_ended").inc()
                log.info(
                    "refresh refused by Quota (%s); grant %s",
                    exc.code,
                    "forgotten" if deleted else "already replaced",
                )
                if not deleted:
                    current = await self.store.get(user_key)
                    if current is not None:
                        return current
                raise WalletNotConnected(detail=f"refresh refused: {exc.code}") from None
            return self._fallback(record, f"refresh answered {exc.status} {exc.code}")
        except QuotaUnavailable as exc:
            return self._fallback(record, exc.detail or "Quota unavailable")

        written = await self.store.compare_and_set(user_key, record.version, fresh)
        if written is not None:
            self._metrics.refreshed("ok")
            try:
                await self.store.remember_rotation(user_key, record.refresh_token, GRACE_S)
            except StoreUnavailable:
                log.warning("could not write the grace record of a rotation; the record is saved")
            return written
        # The record changed under us: a disconnect (or a new connect) won. Do not resurrect.
        self._metrics.refreshed("discarded")
        await self._revoke_quietly(fresh.refresh_token, reason="record changed during refresh")
        current = await self.store.get(user_key)
        if current is None:
            raise WalletNotConnected(detail="disconnected during refresh")
        return current

    def _fallback(self, record: TokenRecord, why: str) -> TokenRecord:
        """Transient refresh failure: keep the record; use its access token while it still works."""
        self._metrics.refreshed("transient")
        if record.is_valid_at(self._clock()):
            log.warning("refresh failed (%s); using the current access token until it expires", why)
            return record
        log.warning("refresh failed (%s) and the access token has expired", why)
        raise RefreshUnavailable(detail=why)

    async def _revoke_quietly(self, refresh_token: str, *, reason: str) -> None:
        try:
            await self._quota.revoke(refresh_token)
        except (QuotaUnavailable, QuotaOAuthError) as exc:
            log.warning("revoking a refresh token at Quota failed (%s): %s", reason, exc)
