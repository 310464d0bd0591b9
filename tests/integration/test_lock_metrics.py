"""Waits for another replica's refresh lease show in ``refresh_lock_wait_seconds``."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import generate_latest

from sidecar.errors import RefreshUnavailable
from sidecar.metrics import Metrics
from sidecar.tokens.lock import RedisRefreshCoordinator
from sidecar.tokens.redis_store import RedisTokenStore
from tests.scrape import parse

WAIT = "quota_sidecar_refresh_lock_wait_seconds"


@pytest.fixture
def store(redis_token_store: RedisTokenStore) -> RedisTokenStore:
    return redis_token_store


def replica(store: RedisTokenStore, metrics: Metrics, max_wait_s: float) -> RedisRefreshCoordinator:
    return RedisRefreshCoordinator(store, lock_ttl_s=5, max_wait_s=max_wait_s, metrics=metrics)


def exposition(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


async def test_a_wait_for_the_lease_is_counted_with_its_duration(store: RedisTokenStore) -> None:
    metrics = Metrics(process=False)
    holder, waiter = replica(store, metrics, 5), replica(store, metrics, 5)
    try:

        async def wait_then_hold() -> None:
            async with waiter.hold("user-a"):
                pass

        async with holder.hold("user-a"):
            waiting = asyncio.create_task(wait_then_hold())
            await asyncio.sleep(0.2)
        async with asyncio.timeout(5):
            await waiting
        scraped = parse(exposition(metrics))
        assert scraped.value(f"{WAIT}_count", outcome="acquired") == 1
        assert scraped.value(f"{WAIT}_sum", outcome="acquired") >= 0.15
        assert scraped.value(f"{WAIT}_count", outcome="timeout") == 0
    finally:
        await holder.close()
        await waiter.close()


async def test_a_wait_that_runs_out_is_counted_as_a_timeout(store: RedisTokenStore) -> None:
    metrics = Metrics(process=False)
    holder, waiter = replica(store, metrics, 5), replica(store, metrics, 0.2)
    try:
        async with holder.hold("user-b"):
            with pytest.raises(RefreshUnavailable):
                async with waiter.hold("user-b"):
                    pass
        scraped = parse(exposition(metrics))
        assert scraped.value(f"{WAIT}_count", outcome="timeout") == 1
        assert scraped.value(f"{WAIT}_count", outcome="acquired") == 0
    finally:
        await holder.close()
        await waiter.close()
