"""Cross-replica single flight for one user's refresh: a renewed Redis lease, with wake-ups.

The lease is ``SET <prefix>:{user}:lock <owner-token> NX PX <lock_ttl>``. Only the holder calls
Quota. While it waits on Quota a background task renews the lease (every third of its life,
compare-and-``PEXPIRE``), so a slow Quota cannot make it lapse and let a second replica spend the
same refresh token. Release is compare-and-delete, then a ``PUBLISH`` on the user's channel wakes
the waiters at once; polling the lease's remaining life is only the fallback for a lost message.

    replica A (holder)                 replica B (waiter)             Redis
    SET lock a1 NX PX 10000 → OK                                      lock = a1
                                       SET lock b1 NX → nil           (wait: pub/sub or PTTL)
    refresh at Quota … renew lease                                    lock ttl reset
    CAS tokens v1 → v2
    DEL lock if = a1; PUBLISH changed                                 lock gone
                                       woken; SET lock b1 NX → OK
                                       re-read tokens → v2: fresh, no Quota call
                                       DEL lock if = b1

If the holder dies, its lease expires after ``lock_ttl_s`` and a waiter takes over; it re-reads
the record first, so if the dead holder had already written, nothing is sent to Quota again.
The context manager is entered inside the manager's shielded refresh task, so a cancelled client
request never leaves the lock held: release runs when the refresh itself ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import redis.asyncio as aioredis

from sidecar.errors import RefreshUnavailable, StoreUnavailable
from sidecar.metrics import Metrics
from sidecar.tokens.redis_store import REDIS_ERRORS, RedisTokenStore

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# Fallback only: waiters are normally woken by the holder's PUBLISH.
POLL_INTERVAL_S = 0.5
LISTENER_STOP_S = 2.0
LISTENER_RETRY_MIN_S = 0.1
LISTENER_READ_S = 0.5
LISTENER_RETRY_MAX_S = 5.0


@contextlib.contextmanager
def _store_errors(operation: str, metrics: Metrics | None = None) -> Iterator[None]:
    try:
        yield
    except REDIS_ERRORS as exc:
        if metrics is not None:
            metrics.store_failed(operation)
        raise StoreUnavailable(detail=f"redis {operation}: {type(exc).__name__}") from exc


def owner_id() -> str:
    """Who holds a lease: host and pid (for operators reading Redis), then a random part."""
    return f"{socket.gethostname()}:{os.getpid()}"


class RedisRefreshCoordinator:
    """``RefreshCoordinator`` over Redis, shared by every replica using the same store."""

    def __init__(
        self,
        store: RedisTokenStore,
        *,
        lock_ttl_s: float,
        max_wait_s: float,
        poll_interval_s: float = POLL_INTERVAL_S,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._store = store
        self._client = store.client
        self._ttl_ms = max(1, int(lock_ttl_s * 1000))
        self._max_wait_s = max_wait_s
        self._poll_s = poll_interval_s
        self._owner = owner_id()
        self._renew = self._client.register_script(_RENEW)
        self._release = self._client.register_script(_RELEASE)
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._closed = False
        self._subscribed = False
        # Bumped whenever the subscription starts or stops: notices may have been missed in
        # between, so what was cached under an older generation is not trusted (see cache.py).
        self._generation = 0
        self._on_change: list[Callable[[str], None]] = []
        self.lock_waits = 0  # refreshes that found another replica holding the lease

    @property
    def subscribed(self) -> bool:
        """Whether wake-ups arrive now (else waiters fall back to polling the lease)."""
        return self._subscribed

    @property
    def generation(self) -> int:
        """Changes each time the subscription starts or stops."""
        return self._generation

    def on_change(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(user_key)`` for every change notice received (any replica's write)."""
        self._on_change.append(callback)

    def channel(self, user_key: str) -> str:
        return self._store.changed_channel(user_key)

    @contextlib.asynccontextmanager
    async def hold(self, user_key: str) -> AsyncIterator[None]:
        key = self._store.lock_key(user_key)
        token = f"{self._owner}:{secrets.token_hex(8)}"
        await self._acquire(user_key, key, token)
        held = asyncio.Event()
        held.set()
        renewer = asyncio.create_task(self._keep_alive(key, token, held))
        try:
            yield
        finally:
            held.clear()  # ends the renewer even if it swallows the cancellation (_keep_alive)
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await self._give_back(user_key, key, token)

    def start(self) -> None:
        """Subscribe to wake-ups now, so the first waiter does not miss an early release."""
        self._ensure_listener()

    async def close(self) -> None:
        """Stop the wake-up listener; bounded, since redis-py can swallow a cancellation that
        lands while its pub/sub connection is being set up (that once hung a shutdown)."""
        self._closed = True
        task, self._listener = self._listener, None
        if task is not None:
            task.cancel()
            # A swallowed cancellation still ends at the next read's timeout (LISTENER_READ_S).
            _, pending = await asyncio.wait({task}, timeout=LISTENER_STOP_S)
            if pending:
                log.warning("the refresh wake-up listener did not stop in time; leaving it")

    async def _acquire(self, user_key: str, key: str, token: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_wait_s
        woken = asyncio.Event()
        self._waiters.setdefault(user_key, set()).add(woken)  # before SET NX: no lost wake-up
        counted = False
        wait_started = loop.time()
        try:
            while True:
                woken.clear()
                with _store_errors("lock", self._metrics):
                    if await self._client.set(key, token, nx=True, px=self._ttl_ms):
                        if counted:
                            self._waited("acquired", loop.time() - wait_started)
                        return
                    remaining_ms = await self._client.pttl(key)
                if remaining_ms == -2:
                    continue  # released between the two calls
                if not counted:
                    self.lock_waits += 1
                    counted = True
                    wait_started = loop.time()
                self._ensure_listener()
                left = deadline - loop.time()
                if left <= 0:
                    self._waited("timeout", loop.time() - wait_started)
                    raise RefreshUnavailable(
                        detail="another replica's refresh for this user did not finish in time"
                    )
                lease_s = remaining_ms / 1000 if remaining_ms > 0 else self._poll_s
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), min(self._poll_s, lease_s, left))
        finally:
            waiters = self._waiters.get(user_key)
            if waiters is not None:
                waiters.discard(woken)
                if not waiters:
                    del self._waiters[user_key]

    def _waited(self, outcome: str, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.lock_wait.labels(outcome).observe(seconds)

    async def _keep_alive(self, key: str, token: str, held: asyncio.Event) -> None:
        """Renew the lease every third of its life while ``held`` is set.

        Cancelling alone cannot stop this loop: on Python 3.11 a cancellation that lands as a
        renewal's reply arrives is dropped by ``asyncio.wait_for`` inside redis-py, the call
        returns normally, and the loop would renew a released hold's lease for ever (and the
        hold would never end). So the loop also looks at ``held`` before every renewal.
        """
        interval = self._ttl_ms / 3000
        while held.is_set():
            await asyncio.sleep(interval)
            if not held.is_set():
                return
            try:
                renewed = await self._renew(keys=[key], args=[token, self._ttl_ms])
            except REDIS_ERRORS as exc:
                log.warning("could not renew the refresh lease (%s); retrying", type(exc).__name__)
                continue
            if not renewed:
                log.warning("the refresh lease was lost before the refresh ended")
                return

    async def _give_back(self, user_key: str, key: str, token: str) -> None:
        try:
            await self._release(keys=[key], args=[token])
            await self._client.publish(self.channel(user_key), b"1")
        except REDIS_ERRORS as exc:
            # The lease expires by itself; waiters poll its remaining life meanwhile.
            log.warning("could not release the refresh lease (%s)", type(exc).__name__)

    def _ensure_listener(self) -> None:
        if self._closed:
            return
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        """Keep one pattern subscription per process, resubscribing with backoff when it drops.

        A dead listener would not lose a wake-up for good (waiters poll the lease), but it
        would turn every lock wait into polling; so any failure is logged and retried.
        """
        delay = LISTENER_RETRY_MIN_S
        while not self._closed:
            try:
                await self._listen_once()
                delay = LISTENER_RETRY_MIN_S  # a clean end: the server closed the connection
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the wake-up channel die
                log.info(
                    "refresh wake-up channel unavailable (%s: %s); waiters poll until it is back",
                    type(exc).__name__,
                    exc,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, LISTENER_RETRY_MAX_S)

    async def _listen_once(self) -> None:
        pattern = self._store.changed_pattern
        client = await self._subscriber_client()
        pubsub: Any = client.pubsub()
        try:
            await pubsub.psubscribe(pattern)
            self._subscribed = True
            self._generation += 1
            # Reads end every LISTENER_READ_S to look at ``_closed``: a cancellation redis-py
            # swallows while it reconnects cannot keep the listener (and its socket) alive.
            while not self._closed:
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=LISTENER_READ_S
                )
                if message is None or message.get("type") != "pmessage":
                    continue
                channel = message.get("channel", b"")
                if isinstance(channel, bytes):
                    channel = channel.decode("utf-8", "replace")
                user_key = channel.partition("{")[2].partition("}")[0]
                for callback in self._on_change:
                    callback(user_key)
                for event in self._waiters.get(user_key, ()):
                    event.set()
        finally:
            if self._subscribed:
                self._subscribed = False
                self._generation += 1
            with contextlib.suppress(*REDIS_ERRORS):
                await pubsub.aclose()
            if client is not self._client:
                with contextlib.suppress(*REDIS_ERRORS):
                    await client.aclose()

    async def _subscriber_client(self) -> Any:
        """The client to subscribe with: the store's own, or on a cluster one node's.

        A cluster's pub/sub is broadcast (a PUBLISH reaches subscribers on every node), so one
        node will do. redis-py's cluster pub/sub would borrow a connection from that node's
        command pool, where a topology refresh can close it under a running command; a
        connection of its own keeps the subscription out of the command traffic's way.
        """
        if not isinstance(self._client, aioredis.RedisCluster):
            return self._client
        await self._client.initialize()
        node = self._client.get_default_node()
        pool = aioredis.ConnectionPool(
            connection_class=node.connection_class, max_connections=2, **node.connection_kwargs
        )
        return aioredis.Redis.from_pool(pool)
