"""``/readyz`` follows the token store: Redis behind a TCP proxy that the test stops and starts."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import Stack
from tests.scrape import scrape
from tests.support import TcpProxy, through

WAIT_S = 10.0


@pytest.fixture
def store_spec(redis_proxy: TcpProxy, redis_url: str) -> str:
    return through(redis_proxy, redis_url)


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.json()


async def wait_for_status(url: str, status: int) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:
        got, body = await get(url)
        if got == status:
            return body
        assert time.monotonic() < deadline, f"{url} stayed {got}: {body}"
        await asyncio.sleep(0.05)


async def test_readyz_turns_false_when_redis_stops_and_true_when_it_returns(
    stack: Stack, redis_proxy: TcpProxy
) -> None:
    ready = await wait_for_status(f"{stack.admin_url}/readyz", 200)
    assert ready["status"] == "ready"
    assert ready["failed"] == []
    assert ready["checks"]["store"] == {"ok": True, "backend": "redis"}
    assert ready["checks"]["quota_discovery"] == {"ok": True, "skipped": True}

    await redis_proxy.stop()
    down = await wait_for_status(f"{stack.admin_url}/readyz", 503)
    assert down["status"] == "not_ready"
    assert down["failed"] == ["store"]
    assert down["checks"]["store"]["ok"] is False
    assert "redis" in down["checks"]["store"]["error"]
    assert await get(f"{stack.admin_url}/healthz") == (200, {"status": "ok"})

    await redis_proxy.start()
    back = await wait_for_status(f"{stack.admin_url}/readyz", 200)
    assert back["failed"] == []


async def test_store_errors_are_counted_while_redis_is_away(
    stack: Stack, redis_proxy: TcpProxy
) -> None:
    await stack.connect("alice")
    await redis_proxy.stop()
    resp = await stack.chat("alice")
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "store_unavailable"
    scraped = await scrape(stack.admin_url)
    assert scraped.value("quota_sidecar_store_errors_total", operation="get") >= 1
    assert scraped.value("quota_sidecar_requests_total", route="v1", status="503") == 1

    await redis_proxy.start()
    deadline = time.monotonic() + WAIT_S
    while (resp := await stack.chat("alice")).status != 200:
        assert time.monotonic() < deadline, "the sidecar did not recover by itself"
        await asyncio.sleep(0.05)
