"""With the Redis store, steady-state calls read nothing from Redis, and any replica's change
reaches every replica's cached copy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from sidecar.tokens.cache import RecordCache
from tests.integration.conftest import Stack
from tests.integration.sidecars import Running, another_sidecar
from tests.support import approve_consent

WAIT_S = 5.0  # a bound on a lost notice, not a speed target


def cache_of(stack: Stack) -> RecordCache:
    cache = stack.services.tokens.cache
    assert cache is not None, "the Redis store keeps a record cache"
    return cache


async def notices_flowing(stack: Stack) -> None:
    async with asyncio.timeout(WAIT_S):
        while not cache_of(stack).active:
            await asyncio.sleep(0.01)


async def hmget_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_hmget", {}).get("calls", 0))


async def test_steady_state_calls_read_nothing_from_redis(
    stack: Stack, redis_client: aioredis.Redis
) -> None:
    await notices_flowing(stack)
    await stack.connect("alice")
    assert (await stack.chat("alice")).status == 200  # reads and keeps the record
    before = await hmget_calls(redis_client)
    for _ in range(20):
        resp = await stack.chat("alice")
        assert resp.status == 200
        await resp.read()
    assert await hmget_calls(redis_client) == before
    assert stack.quota.counters["chat.completions"] == 21


@pytest.fixture
async def replica(stack: Stack, redis_url: str) -> AsyncIterator[Running]:
    async with another_sidecar(stack, store_spec=redis_url, same_app=True) as running:
        yield running


async def test_a_disconnect_on_another_replica_ends_the_cached_copy_here(
    stack: Stack, replica: Running
) -> None:
    await notices_flowing(stack)
    await stack.connect("alice")
    assert (await stack.chat("alice")).status == 200
    user_key = stack.user_key("alice")
    assert cache_of(stack).get(user_key, stack.clock()) is not None
    resp = await stack.backend.post(
        f"{replica.internal_url}/auth/quota/disconnect", headers={"X-Quota-User": "alice"}
    )
    assert resp.status == 200
    async with asyncio.timeout(WAIT_S):
        while cache_of(stack).get(user_key, stack.clock()) is not None:
            await asyncio.sleep(0.01)
    gone = await stack.chat("alice")
    assert gone.status == 401
    assert (await gone.json())["error"]["code"] == "wallet_not_connected"


async def test_a_reconnect_on_another_replica_is_used_here_at_once(
    stack: Stack, replica: Running
) -> None:
    """The new grant replaces the old one everywhere; the old token, revoked, is never sent."""
    await notices_flowing(stack)
    await stack.connect("alice")
    assert (await stack.chat("alice")).status == 200
    old = await stack.store.get(stack.user_key("alice"))
    assert old is not None
    stack.browser.sign_in(replica.public_url, "alice")
    consent = await stack.browser.get(f"{replica.public_url}/auth/quota/connect")
    assert consent.status == 200
    await approve_consent(stack.browser, consent, "alice@example.com")
    new = await stack.store.get(stack.user_key("alice"))
    assert new is not None
    assert new.access_token != old.access_token
    async with asyncio.timeout(WAIT_S):
        while True:
            cached = cache_of(stack).get(stack.user_key("alice"), stack.clock())
            if cached is None or cached.access_token == new.access_token:
                break
            await asyncio.sleep(0.01)
    resp = await stack.chat("alice")
    assert resp.status == 200
    sent = [r for r in stack.quota.requests if r.path == "/v1/chat/completions"][-1]
    assert sent.headers["Authorization"] == f"Bearer {new.access_token}"


@pytest.fixture
def store_kind() -> str:
    return "redis"
