"""The product, end to end: connect a wallet in a browser, bill a chat to it, read the balance."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from tests.integration.conftest import Stack


async def test_round_trip_connects_bills_and_reads_the_balance(
    stack: Stack, redis_client: aioredis.Redis
) -> None:
    landed = await stack.connect("alice", "alice@example.com")
    assert landed.status == 200
    assert landed.url.path == "/home"  # return_to honoured, through the proxy to the host app
    assert stack.quota.counters["token.authorization_code"] == 1

    record = await stack.store.get(stack.user_key("alice"))
    assert record is not None
    assert record.access_token.startswith("quota_token_")
    raw = b"".join(
        [
            k + b"=" + v
            for key in await redis_client.keys(f"{stack.config.tokens.key_prefix}:*")
            for k, v in (await redis_client.hgetall(key)).items()
        ]
    )
    assert raw, "the record is in Redis"
    assert b"quota_token_" not in raw
    assert b"quota_refresh_" not in raw
    assert b"alice" not in raw

    before = stack.quota.balance("alice@example.com")
    resp = await stack.chat("alice")
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["quota"]["credits_used"] > 0
    assert stack.quota.balance("alice@example.com") == before - body["quota"]["credits_used"]

    balance = await stack.browser.get(f"{stack.public_url}/auth/quota/balance")
    assert balance.status == 200
    assert (await balance.json())["balance"] == stack.quota.balance("alice@example.com")

    status = await stack.browser.get(f"{stack.public_url}/auth/quota/status")
    assert (await status.json())["connected"] is True


@pytest.mark.parametrize("store_kind", ["memory"])
async def test_round_trip_works_on_the_memory_store(stack: Stack) -> None:
    landed = await stack.connect("bob")
    assert landed.status == 200
    resp = await stack.chat("bob")
    assert resp.status == 200
