"""Hands out fresh access tokens: refresh before expiry, once per expiry, and never lose a grant.

Refresh ahead: a record enters its refresh window ``refresh_skew_s`` before expiry, but callers
wait for the refresh only in the last ``refresh_wait_skew_s``; until then the first caller starts
it in the background and every caller goes on with the current, still valid token. With the
default skews::

    expires_at - 30 s               expires_at - 5 s               expires_at
    ─────────┼──────────────────────────────┼──────────────────────────────┼──
     cached  │ read the store; start the    │ read the store; await the     │ (expired:
     copy    │ refresh if none is running;  │ refresh (the one running, or  │  await it
             │ use the current token        │ a new one); use the new token │  too)

    call 1 (25 s left)   get → v1 in window, no refresh running: start R; use v1 at once
    call 2 (24 s left)   get → v1 in window, R running: use v1 at once
    R                    hold(user), re-read v1, token call … CAS(v1 → v2), drop cached copy
    call 3               get → v2, fresh: use v2 (and cache it)

R is the same single-flight task a waiting caller would share (the same lease, writes and
fallbacks); only no caller awaits it, so its failure ends in the log and ``refreshes_total``.
After a transient failure (noted on the record, so every replica sees it) the next one starts
no sooner than ``AHEAD_RETRY_S`` later; a caller inside the wait skew still waits, as before.

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

The record's status travels with it: a refresh carries the user ids and ``needs_reconnect``
over to the new pair and notes its outcome in the same write (a transient failure is noted by a
compare-and-set of its own, at refresh time only — never on a request that needs no refresh).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Protocol

from sidecar.errors import (
    QuotaUnavailable,
    RefreshUnavailable,
    SidecarError,
    StoreUnavailable,
    WalletNotConnected,
)
from sidecar.metrics import Metrics
from sidecar.oauth import QuotaClient, QuotaOAuthError
from sidecar.tokens.cache import RecordCache
from sidecar.tokens.model import TokenRecord
from sidecar.tokens.store import TokenStore

log = logging.getLogger(__name__)

# How long a rotated refresh token is remembered, so a request that raced in late re-reads
# instead of presenting the spent token to Quota.
GRACE_S = 60.0
# Compare-and-set attempts for a status write racing a refresh (the refresh wins; we re-read).
STATUS_WRITE_ATTEMPTS = 3
# At shutdown, how long refreshes still running (ahead of expiry, or whose callers left) and
# status notes get to finish. The write after Quota's answer is one store round trip, and a
# token call answers in well under this; longer would eat into the few seconds a pod has left
# after shutdown.grace_s (terminationGracePeriodSeconds 30 vs 2 + 25 by default).
CLOSE_WAIT_S = 2.0
# After a refresh failed for a transient reason, a call in the window starts the next one no
# sooner than this: the current token still works, a failing Quota is not sent one refresh per
# call, and the 25 s between the default skews still hold a few tries before callers must wait.
AHEAD_RETRY_S = 5.0


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
        refresh_wait_skew_s: float,
        clock: Callable[[], float] = time.time,
        coordinator: RefreshCoordinator | None = None,
        metrics: Metrics | None = None,
        cache: RecordCache | None = None,
    ) -> None:
        self.store = store
        self._cache = cache
        self._metrics = metrics or Metrics(process=False)
        self._quota = quota
        self._skew = refresh_skew_s
        self._wait_skew = refresh_wait_skew_s
        self._clock = clock
        self._coordinator = coordinator or LocalCoordinator()
        self._inflight: dict[str, asyncio.Task[TokenRecord]] = {}
        self._background: set[asyncio.Task[TokenRecord | None]] = set()

    @property
    def cache(self) -> RecordCache | None:
        """The in-process copies of opened records (Redis store only; see ``cache``)."""
        return self._cache

    async def current(self, user_key: str) -> TokenRecord | None:
        """The stored record as it is, without refreshing (for status pages)."""
        return await self.store.get(user_key)

    async def fresh(self, user_key: str) -> TokenRecord:
        """A record whose access token is good for at least ``refresh_wait_skew_s`` more seconds
        (with under ``refresh_skew_s`` left, its refresh is started in the background), or the
        current one while it is still valid when a refresh failed transiently."""
        now = self._clock()
        cache = self._cache
        mark = 0
        if cache is not None:
            cached = cache.get(user_key, now)  # never kept into the wait skew
            if cached is not None:
                if cached.expires_within(now, self._skew):
                    self._refresh_ahead(user_key, cached, now)
                return cached
            mark = cache.mark()
        record = await self.store.get(user_key)
        if record is None:
            raise WalletNotConnected
        if record.expires_within(now, self._wait_skew) or not record.is_valid_at(now):
            return await self._single_flight(user_key, stale_version=None)
        if cache is not None:
            cache.remember(user_key, record, mark, now)
        if record.expires_within(now, self._skew):
            self._refresh_ahead(user_key, record, now)
        return record

    def _refresh_ahead(self, user_key: str, record: TokenRecord, now: float) -> None:
        """Start the user's refresh without waiting for it, unless one is running already or
        the last one failed transiently less than ``AHEAD_RETRY_S`` ago."""
        failed_lately = (
            record.last_refresh_outcome == "transient"
            and now - (record.last_refresh_at or 0.0) < AHEAD_RETRY_S
        )
        if user_key not in self._inflight and not failed_lately:
            self._start(user_key, stale_version=None, ahead=True)

    def _changed(self, user_key: str) -> None:
        """This process changed the record: drop its cached copy now (the change notice from
        the write drops it too, a moment later)."""
        if self._cache is not None:
            self._cache.drop(user_key)

    async def after_rejection(self, user_key: str, rejected: TokenRecord) -> TokenRecord:
        """Quota refused ``rejected``'s access token (401): refresh even if it looks unexpired."""
        return await self._single_flight(user_key, stale_version=rejected.version)

    async def connect(self, user_key: str, record: TokenRecord) -> TokenRecord:
        """Store a new grant, replacing any earlier one (whose refresh token is then revoked)."""
        previous = await self.store.get(user_key)
        written = await self.store.put(user_key, record)
        self._changed(user_key)
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
        self._changed(user_key)
        self._metrics.wallets_disconnected.labels("user").inc()
        await self._revoke_quietly(record.refresh_token, reason="disconnect")
        return True

    async def forget_quota_user(self, quota_user_id: str, *, reason: str) -> list[str | None]:
        """Forget every user's grant of Quota user ``quota_user_id`` (Quota revoked it).

        Compare-and-delete on the record read, so a reconnect with another Quota account that
        lands meanwhile is kept. A grant whose access token Quota still accepts is kept too:
        whether Quota announces the revocation of one grant while a newer one (a reconnect)
        lives is not documented, and dropping the live grant would disconnect the user. Returns
        the host user ids of the grants forgotten (``None`` for records that predate the id).
        """
        forgotten: list[str | None] = []
        for user_key in await self.store.user_keys_for_quota_user(quota_user_id):
            for _ in range(STATUS_WRITE_ATTEMPTS):
                record = await self.store.get(user_key)
                if record is None or record.quota_user_id != quota_user_id:
                    break
                if await self._still_accepted(record):
                    log.info("a grant of a disconnected Quota user still works; kept")
                    break
                if await self.store.compare_and_delete(user_key, record.version):
                    self._changed(user_key)
                    forgotten.append(record.user_id)
                    self._metrics.wallets_disconnected.labels(reason).inc()
                    break
        return forgotten

    async def _still_accepted(self, record: TokenRecord) -> bool:
        """Whether Quota still takes this record's (unexpired) access token at ``/oauth/userinfo``:
        a 2xx, or a 403 for a scope the grant lacks (the token itself authenticated).

        Anything else — 401, an expired token, Quota unreachable — leaves the signed webhook's
        word standing; a grant kept by mistake would only fail its next refresh."""
        if not record.is_valid_at(self._clock()):
            return False
        try:
            status, _, _ = await self._quota.get_json("/oauth/userinfo", record.access_token)
        except QuotaUnavailable:
            return False
        return 200 <= status < 300 or status == 403

    async def mark_needs_reconnect(
        self, user_key: str, refused: TokenRecord, missing: Iterable[str]
    ) -> TokenRecord | None:
        """Quota refused ``refused``'s token for lacking a scope: note it on the record.

        A compare-and-set; if a refresh wrote meanwhile, the new record (same grant) is marked
        instead, unless it already holds every missing scope (a new connect fixed it). Never
        raises: the refusal already went to the caller, and a failed note is only logged.
        """
        wanted = tuple(dict.fromkeys(missing))
        current: TokenRecord | None = refused
        try:
            for _ in range(STATUS_WRITE_ATTEMPTS):
                if current is None:
                    return None
                replaced = current.version != refused.version
                if replaced and wanted and all(scope in current.scopes for scope in wanted):
                    return current  # replaced by a grant that has the scope
                if current.needs_reconnect and all(s in current.missing_scopes for s in wanted):
                    return current
                marked = dataclasses.replace(
                    current,
                    needs_reconnect=True,
                    missing_scope=" ".join(dict.fromkeys([*current.missing_scopes, *wanted])),
                )
                written = await self.store.compare_and_set(user_key, current.version, marked)
                if written is not None:
                    self._changed(user_key)
                    log.info(
                        "grant lacks a scope; the user must reconnect (%s)", marked.missing_scope
                    )
                    return written
                current = await self.store.get(user_key)
        except StoreUnavailable as exc:
            log.warning("could not note that a grant lacks a scope: %s", exc.detail)
        return None

    def mark_needs_reconnect_soon(
        self, user_key: str, refused: TokenRecord, missing: Iterable[str]
    ) -> None:
        """``mark_needs_reconnect`` in the background (from code that cannot await)."""
        task = asyncio.create_task(self.mark_needs_reconnect(user_key, refused, tuple(missing)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Let refreshes and status notes still running finish (bounded), before the store
        closes: once Quota has rotated a refresh token, the write of the new pair must land."""
        refreshes = set(self._inflight.values())
        running: set[asyncio.Task[TokenRecord | None]] = {*refreshes, *self._background}
        if not running:
            return
        _, pending = await asyncio.wait(running, timeout=CLOSE_WAIT_S)
        for task in pending:
            task.cancel()
        if pending:
            cut = len(pending & refreshes)
            if cut:
                log.warning(
                    "%d token refresh(es) still running after %g s at shutdown were cut; if Quota "
                    "had already rotated a user's tokens, that user must connect again",
                    cut,
                    CLOSE_WAIT_S,
                )
            await asyncio.gather(*pending, return_exceptions=True)

    async def revoke_orphan(self, record: TokenRecord) -> None:
        """Revoke a grant that could not be stored, so it does not linger at Quota."""
        await self._revoke_quietly(record.refresh_token, reason="could not be stored")

    async def _single_flight(self, user_key: str, *, stale_version: int | None) -> TokenRecord:
        task = self._inflight.get(user_key) or self._start(user_key, stale_version=stale_version)
        return await asyncio.shield(task)

    def _start(
        self, user_key: str, *, stale_version: int | None, ahead: bool = False
    ) -> asyncio.Task[TokenRecord]:
        """The user's one refresh task; ``ahead``: started for no caller (see the docstring)."""
        task = asyncio.create_task(self._refresh(user_key, stale_version))
        self._inflight[user_key] = task
        task.add_done_callback(lambda t: self._finished(user_key, t, ahead=ahead))
        return task

    def _finished(self, user_key: str, task: asyncio.Task[TokenRecord], *, ahead: bool) -> None:
        if self._inflight.get(user_key) is task:
            del self._inflight[user_key]
        if task.cancelled():
            return
        exc = task.exception()  # mark retrieved: every waiter may have gone away
        if exc is None or not ahead:
            return  # a waiting caller's answer carries its failure
        if isinstance(exc, SidecarError):
            level = logging.INFO if isinstance(exc, WalletNotConnected) else logging.WARNING
            log.log(level, "a refresh ahead of expiry failed: %s", exc)
        else:
            log.error("a refresh ahead of expiry failed", exc_info=exc)

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
                self._changed(user_key)
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
            return await self._fallback(
                user_key, record, f"refresh answered {exc.status} {exc.code}"
            )
        except QuotaUnavailable as exc:
            return await self._fallback(user_key, record, exc.detail or "Quota unavailable")

        fresh = self._carry_over(record, fresh)
        written = await self.store.compare_and_set(user_key, record.version, fresh)
        self._changed(user_key)
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

    def _carry_over(self, old: TokenRecord, fresh: TokenRecord) -> TokenRecord:
        """The refreshed pair with the old record's ids and status, and this refresh's outcome.

        A refresh keeps the grant, so a missing scope stays missing unless Quota now grants it.
        """
        still_missing = [scope for scope in old.missing_scopes if scope not in fresh.scopes]
        return dataclasses.replace(
            fresh,
            user_id=old.user_id,
            quota_user_id=old.quota_user_id,
            needs_reconnect=old.needs_reconnect and (bool(still_missing) or not old.missing_scope),
            missing_scope=" ".join(still_missing),
            last_refresh_outcome="ok",
            last_refresh_at=self._clock(),
        )

    async def _fallback(self, user_key: str, record: TokenRecord, why: str) -> TokenRecord:
        """Transient refresh failure: keep the record; use its access token while it still works.

        The failure is noted on the record (we hold the refresh lock, so the compare-and-set
        normally succeeds); a note that cannot be written is only logged.
        """
        self._metrics.refreshed("transient")
        noted = dataclasses.replace(
            record, last_refresh_outcome="transient", last_refresh_at=self._clock()
        )
        try:
            record = await self.store.compare_and_set(user_key, record.version, noted) or record
            self._changed(user_key)
        except StoreUnavailable:
            log.warning("could not note a transient refresh failure on the record")
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
