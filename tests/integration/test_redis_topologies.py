"""The Redis store on each topology the factory accepts: standalone, Cluster, Sentinel.

The whole contract runs on a cluster in ``test_token_store_contract.py``; here is what depends
on the topology itself: where keys land, how the store lists users across nodes, how it fails
when nothing answers, and a smoke run through a sentinel to a real master.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from sidecar.errors import StoreUnavailable
from sidecar.tokens.crypto import Sealer
from sidecar.tokens.factory import create_store
from sidecar.tokens.redis_store import RedisClient, RedisTokenStore
from sidecar.tokens.store import TokenStore
from tests.integration.test_token_store_contract import (
    OPERATIONS,
    closed_loopback_port,
    make_record,
    new_user_key,
)

MakeSealer = Callable[..., Sealer]
DOWN_BOUND_S = 10.0  # a store with nothing behind it must say so well within this
BURST = 300  # concurrent commands for one user: three times redis-py's default pool size


@pytest.fixture
async def cluster_store(
    redis_cluster_url: str, redis_cluster_prefix: str, make_sealer: MakeSealer
) -> AsyncIterator[RedisTokenStore]:
    store = create_store(redis_cluster_url, make_sealer(), prefix=redis_cluster_prefix)
    assert isinstance(store, RedisTokenStore)
    yield store
    await store.close()


async def test_every_key_of_a_user_hashes_to_the_same_cluster_slot(
    cluster_store: RedisTokenStore,
) -> None:
    for user in (new_user_key() for _ in range(20)):
        keys = (
            cluster_store.tokens_key(user),
            cluster_store.lock_key(user),
            cluster_store.rotated_key(user, "rt-spent"),
        )
        assert len({key_slot(key.encode()) for key in keys}) == 1


async def test_a_rotation_mark_is_the_token_fingerprint_with_an_expiry(
    redis_url: str, redis_prefix: str, redis_client: aioredis.Redis, make_sealer: MakeSealer
) -> None:
    store = create_store(redis_url, make_sealer(), prefix=redis_prefix)
    user = new_user_key()
    try:
        await store.remember_rotation(user, "rt-spent", ttl_s=30)
    finally:
        await store.close()
    fingerprint = hashlib.sha256(b"rt-spent").hexdigest()[:32]
    key = f"{redis_prefix}:{{{user}}}:rotated:{fingerprint}"
    assert await redis_client.get(key) == b"1"
    assert 0 < await redis_client.pttl(key) <= 30_000


async def test_the_cluster_store_spreads_users_over_every_primary_and_lists_them_all(
    cluster_store: RedisTokenStore,
) -> None:
    client = cluster_store.client
    assert isinstance(client, aioredis.RedisCluster)
    users = {new_user_key() for _ in range(30)}
    for user in users:
        await cluster_store.put(user, make_record())

    nodes = {client.get_node_from_key(cluster_store.tokens_key(user)).name for user in users}
    assert len(nodes) == len(client.get_primaries()) == 3, "30 users reach every primary"
    assert {user async for user in cluster_store.scan_user_keys()} == users


async def test_the_cluster_store_writes_each_user_on_the_node_that_owns_its_slot(
    cluster_store: RedisTokenStore,
) -> None:
    client = cluster_store.client
    assert isinstance(client, aioredis.RedisCluster)
    user = new_user_key()
    written = await cluster_store.put(user, make_record())
    await cluster_store.remember_rotation(user, written.refresh_token, ttl_s=30)

    owner = client.get_node_from_key(cluster_store.tokens_key(user))
    direct = aioredis.Redis(host=owner.host, port=owner.port)
    try:
        assert (
            await direct.hget(cluster_store.tokens_key(user), "v") == str(written.version).encode()
        )
        assert await direct.exists(cluster_store.rotated_key(user, written.refresh_token)) == 1
    finally:
        await direct.aclose()


async def test_a_burst_of_concurrent_reads_for_one_user_waits_for_connections_instead_of_failing(
    any_topology_url: str, make_sealer: MakeSealer
) -> None:
    store = create_store(any_topology_url, make_sealer(), prefix="test-burst")
    user = new_user_key()
    try:
        async with asyncio.timeout(DOWN_BOUND_S):
            results = await asyncio.gather(
                *(store.get(user) for _ in range(BURST)), return_exceptions=True
            )
    finally:
        await store.close()
    assert [result for result in results if result is not None] == []


async def assert_unavailable_quickly(
    store: TokenStore, operation: Callable[[TokenStore, str], Awaitable[object]]
) -> StoreUnavailable:
    try:
        async with asyncio.timeout(DOWN_BOUND_S):
            with pytest.raises(StoreUnavailable) as caught:
                await operation(store, new_user_key())
    finally:
        await store.close()
    return caught.value


@pytest.mark.parametrize("operation", OPERATIONS.values(), ids=OPERATIONS.keys())
async def test_the_cluster_store_raises_store_unavailable_quickly_when_no_node_answers(
    make_sealer: MakeSealer, operation: Callable[[TokenStore, str], Awaitable[object]]
) -> None:
    nodes = ",".join(f"127.0.0.1:{closed_loopback_port()}" for _ in range(3))
    store = create_store(f"redis+cluster://{nodes}", make_sealer())

    error = await assert_unavailable_quickly(store, operation)

    assert error.detail is not None
    assert "RedisClusterException" in error.detail or "ConnectionError" in error.detail


async def test_the_cluster_store_listing_raises_store_unavailable_when_no_node_answers(
    make_sealer: MakeSealer,
) -> None:
    store = create_store(f"redis+cluster://127.0.0.1:{closed_loopback_port()}", make_sealer())

    async def scan(store: TokenStore, user: str) -> object:
        return [key async for key in store.scan_user_keys()]

    await assert_unavailable_quickly(store, scan)


# --- Sentinel -----------------------------------------------------------------------------------


@pytest.fixture
async def sentinel_store(
    redis_sentinel_url: str, make_sealer: MakeSealer
) -> AsyncIterator[RedisTokenStore]:
    store = create_store(redis_sentinel_url, make_sealer(), prefix="test-sentinel")
    assert isinstance(store, RedisTokenStore)
    yield store
    await store.close()


async def test_the_sentinel_store_finds_the_master_and_keeps_the_contract(
    sentinel_store: RedisTokenStore,
) -> None:
    store, user = sentinel_store, new_user_key()
    try:
        assert await store.get(user) is None
        first = await store.put(user, make_record())
        assert await store.get(user) == first
        second = await store.compare_and_set(user, first.version, make_record())
        assert second is not None
        assert await store.compare_and_set(user, first.version, make_record()) is None
        assert await store.get(user) == second
        await store.remember_rotation(user, first.refresh_token, ttl_s=30)
        assert await store.was_rotated(user, first.refresh_token) is True
        assert await store.compare_and_delete(user, first.version) is False
        assert await store.delete(user) is True
        assert await store.get(user) is None
        await store.ping()
    finally:
        await store.delete(user)


async def test_the_sentinel_store_writes_to_the_master_the_sentinel_names(
    sentinel_store: RedisTokenStore, redis_sentinel_url: str
) -> None:
    client: RedisClient = sentinel_store.client
    assert isinstance(client, aioredis.Redis)
    user = new_user_key()
    written = await sentinel_store.put(user, make_record())
    try:
        host, port = await client.connection_pool.get_master_address()  # type: ignore[attr-defined]
        direct = aioredis.Redis(host=host, port=port)
        try:
            stored = await direct.hget(sentinel_store.tokens_key(user), "v")
            assert stored == str(written.version).encode()
        finally:
            await direct.aclose()
    finally:
        await sentinel_store.delete(user)


async def test_the_sentinel_store_raises_store_unavailable_quickly_when_no_sentinel_answers(
    make_sealer: MakeSealer,
) -> None:
    url = f"redis+sentinel://127.0.0.1:{closed_loopback_port()}/quota-test"
    store = create_store(url, make_sealer())

    error = await assert_unavailable_quickly(store, OPERATIONS["get"])

    assert error.detail is not None
    assert "MasterNotFoundError" in error.detail
