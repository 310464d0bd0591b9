"""Redis going away under load: 503 store_unavailable, nothing deleted, back within a second."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.integration.conftest import Stack
from tests.support import TcpProxy, through


@pytest.fixture
def store_spec(redis_proxy: TcpProxy, redis_url: str) -> str:
    return through(redis_proxy, redis_url)


async def test_redis_stopped_under_load_gives_503_deletes_nothing_and_recovers_within_a_second(
    stack: Stack, redis_proxy: TcpProxy
) -> None:
    await stack.connect("alice")
    before = await stack.store.get(stack.user_key("alice"))
    assert before is not None
    outcomes: list[tuple[float, int, str]] = []
    stop_load = asyncio.Event()

    async def load() -> None:
        while not stop_load.is_set():
            resp = await stack.chat("alice")
            body = await resp.json()
            code = body.get("error", {}).get("code", "") if resp.status != 200 else ""
            outcomes.append((time.monotonic(), resp.status, code))
            await asyncio.sleep(0.02)

    workers = [asyncio.create_task(load()) for _ in range(8)]
    await asyncio.sleep(0.5)
    await redis_proxy.stop()  # Redis unreachable: connections cut, new ones refused
    down_at = time.monotonic()
    await asyncio.sleep(3)
    await redis_proxy.start()
    up_at = time.monotonic()
    await asyncio.sleep(2)
    stop_load.set()
    await asyncio.gather(*workers)

    during = [o for o in outcomes if down_at + 0.5 < o[0] < up_at]
    assert during, "requests were made while Redis was down"
    assert {(status, code) for _, status, code in during} == {(503, "store_unavailable")}
    after = [o for o in outcomes if o[0] > up_at + 1.0]
    assert after, "requests were made after Redis returned"
    assert {status for _, status, _ in after} == {200}, after[:5]
    assert await stack.store.get(stack.user_key("alice")) == before  # nothing deleted
    assert all(status in (200, 503) for _, status, _ in outcomes)
