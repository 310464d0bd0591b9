"""A released refresh lease wakes the other replicas' waiters over pub/sub, on every topology.

The waiters here poll only every 60 s and the lease lives 60 s, so a waiter that gets the lease
within the test's few seconds can only have been woken by the holder's PUBLISH.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from sidecar.tokens.crypto import Sealer
from sidecar.tokens.factory import create_store
from sidecar.tokens.lock import RedisRefreshCoordinator
from sidecar.tokens.redis_store import RedisTokenStore
from tests.support import TcpProxy, through

SLOW_POLL_S = 60.0
WOKEN_WITHIN_S = 5.0  # a bound on a lost wake-up, not a speed target


def coordinator(store: RedisTokenStore) -> RedisRefreshCoordinator:
    return RedisRefreshCoordinator(
        store, lock_ttl_s=SLOW_POLL_S, max_wait_s=SLOW_POLL_S, poll_interval_s=SLOW_POLL_S
    )


async def wait_until_subscribed(replica: RedisRefreshCoordinator) -> None:
    async with asyncio.timeout(WOKEN_WITHIN_S):
        while not replica.subscribed:
            await asyncio.sleep(0.01)


async def a_waiter_is_woken_by_the_release(
    holder: RedisRefreshCoordinator, waiter: RedisRefreshCoordinator, user: str
) -> None:
    async def wait_then_hold() -> None:
        async with waiter.hold(user):
            pass

    async with holder.hold(user):
        waiting = asyncio.create_task(wait_then_hold())
        async with asyncio.timeout(WOKEN_WITHIN_S):
            while waiter.lock_waits == 0:
                await asyncio.sleep(0.01)
    async with asyncio.timeout(WOKEN_WITHIN_S):
        await waiting


@pytest.fixture
async def two_replicas(
    any_topology_url: str, make_sealer: Callable[..., Sealer]
) -> AsyncIterator[tuple[RedisRefreshCoordinator, RedisRefreshCoordinator]]:
    """Two coordinators on two fresh clients, started before either client has said a word
    to Redis: on a cluster, before the client has learnt the slot layout. (Leases are deleted
    when released, so the random prefix leaves no keys behind.)"""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    sealer = make_sealer()
    stores = [create_store(any_topology_url, sealer, prefix=prefix) for _ in range(2)]
    replicas = []
    for store in stores:
        assert isinstance(store, RedisTokenStore)
        replica = coordinator(store)
        replica.start()
        replicas.append(replica)
    try:
        yield replicas[0], replicas[1]
    finally:
        for replica in replicas:
            await replica.close()
        for store in stores:
            await store.close()


async def test_a_release_wakes_a_waiter_on_another_replica(
    two_replicas: tuple[RedisRefreshCoordinator, RedisRefreshCoordinator],
) -> None:
    holder, waiter = two_replicas
    await wait_until_subscribed(waiter)
    # Users whose keys fall in different slots: on a cluster, on different nodes than the
    # one the waiter subscribed on; a cluster's PUBLISH reaches every node.
    for user in ("user-a", "user-b", "user-c", "user-d"):
        await a_waiter_is_woken_by_the_release(holder, waiter, user)


async def test_the_wake_up_channel_resubscribes_after_its_connection_drops(
    redis_url: str,
    redis_prefix: str,
    redis_proxy: TcpProxy,
    make_sealer: Callable[..., Sealer],
) -> None:
    sealer = make_sealer()
    direct = create_store(redis_url, sealer, prefix=redis_prefix)
    proxied = create_store(through(redis_proxy, redis_url), sealer, prefix=redis_prefix)
    assert isinstance(direct, RedisTokenStore)
    assert isinstance(proxied, RedisTokenStore)
    holder, waiter = coordinator(direct), coordinator(proxied)
    waiter.start()
    try:
        await wait_until_subscribed(waiter)
        await redis_proxy.stop()  # the waiter's subscription is cut …
        async with asyncio.timeout(WOKEN_WITHIN_S):
            while waiter.subscribed:
                await asyncio.sleep(0.01)
        await redis_proxy.start()  # … and Redis comes back on the same port
        await wait_until_subscribed(waiter)
        await a_waiter_is_woken_by_the_release(holder, waiter, "user-e")
    finally:
        await holder.close()
        await waiter.close()
        await direct.close()
        await proxied.close()
