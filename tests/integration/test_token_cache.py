"""Steady-state calls read nothing from Redis and open nothing, any replica's change reaches every
replica's cached copy, and inside the refresh window the copy serves while the refresh runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from sidecar.tokens.cache import RecordCache
from sidecar.tokens.memory import MemoryTokenStore
from sidecar.tokens.model import TokenRecord
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


# --- copies inside the refresh window, and the memory store's copies ------------------------


async def test_calls_inside_the_refresh_window_use_the_copy_while_it_refreshes(
    stack: Stack, redis_client: aioredis.Redis
) -> None:
    """No caller waits and none reads Redis: the copy serves until the refresh's write drops it."""
    await notices_flowing(stack)
    await stack.connect("alice")
    assert (await stack.chat("alice")).status == 200  # reads and keeps the record
    old = await stack.store.get(stack.user_key("alice"))
    assert old is not None
    stack.quota.settings.token_delay_s = 1.0  # the refresh outlasts every call below
    stack.clock.now = old.expires_at - stack.config.tokens.refresh_skew_s + 1
    before = await hmget_calls(redis_client)
    for _ in range(20):
        resp = await stack.chat("alice")
        assert resp.status == 200
        await resp.read()
    # Two reads however many calls: the first call's (the jump in time outlasted the copy's
    # cache_ttl_s), which starts the refresh and keeps a copy, and the refresh's own, under its
    # lease. Every other call used the copy.
    assert await hmget_calls(redis_client) - before == 2
    sent = [r for r in stack.quota.requests if r.path == "/v1/chat/completions"][-20:]
    assert {r.headers["Authorization"] for r in sent} == {f"Bearer {old.access_token}"}
    async with asyncio.timeout(WAIT_S):
        while cache_of(stack).get(stack.user_key("alice"), stack.clock()) is not None:
            await asyncio.sleep(0.01)  # the refresh's write dropped the copy
    assert stack.quota.counters["token.refresh_token"] == 1
    resp = await stack.chat("alice")
    new = await stack.store.get(stack.user_key("alice"))
    assert new is not None
    assert new.access_token != old.access_token
    sent_last = [r for r in stack.quota.requests if r.path == "/v1/chat/completions"][-1]
    assert sent_last.headers["Authorization"] == f"Bearer {new.access_token}"


async def test_no_copy_is_used_inside_the_wait_skew(stack: Stack) -> None:
    await notices_flowing(stack)
    await stack.connect("alice")
    assert (await stack.chat("alice")).status == 200
    old = await stack.store.get(stack.user_key("alice"))
    assert old is not None
    stack.clock.now = old.expires_at - stack.config.tokens.refresh_wait_skew_s + 1
    assert cache_of(stack).get(stack.user_key("alice"), stack.clock()) is None
    resp = await stack.chat("alice")  # waits for the refresh: the new token goes out
    assert resp.status == 200
    new = await stack.store.get(stack.user_key("alice"))
    assert new is not None
    assert new.access_token != old.access_token
    sent = [r for r in stack.quota.requests if r.path == "/v1/chat/completions"][-1]
    assert sent.headers["Authorization"] == f"Bearer {new.access_token}"


@pytest.mark.parametrize("store_kind", ["memory"])
async def test_the_memory_store_opens_a_record_once_for_steady_calls(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = 0
    open_record = MemoryTokenStore._open

    def counting(self: MemoryTokenStore, user_key: str) -> TokenRecord | None:
        nonlocal opened
        opened += 1
        return open_record(self, user_key)

    monkeypatch.setattr(MemoryTokenStore, "_open", counting)
    await stack.connect("alice")
    assert (await stack.chat("alice")).status == 200  # opens the record and keeps it
    before = opened
    for _ in range(20):
        resp = await stack.chat("alice")
        assert resp.status == 200
        await resp.read()
    assert opened == before


@pytest.mark.parametrize("store_kind", ["memory"])
async def test_a_disconnect_drops_the_memory_stores_copy_at_once(stack: Stack) -> None:
    await stack.connect("alice")
    assert (await stack.chat("alice")).status == 200
    assert cache_of(stack).get(stack.user_key("alice"), stack.clock()) is not None
    resp = await stack.backend.post(
        f"{stack.internal_url}/auth/quota/disconnect", headers={"X-Quota-User": "alice"}
    )
    assert resp.status == 200
    assert cache_of(stack).get(stack.user_key("alice"), stack.clock()) is None
    gone = await stack.chat("alice")
    assert gone.status == 401


@pytest.mark.parametrize("store_kind", ["memory"])
async def test_any_write_to_the_memory_store_drops_the_copy(stack: Stack) -> None:
    """Not only the token manager's own writes: whoever writes (a webhook, rotate, a test)."""
    await stack.connect("alice")
    assert (await stack.chat("alice")).status == 200
    user_key = stack.user_key("alice")
    record = await stack.store.get(user_key)
    assert record is not None
    await stack.store.compare_and_set(user_key, record.version, record)
    assert cache_of(stack).get(user_key, stack.clock()) is None
