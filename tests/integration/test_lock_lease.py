"""The refresh lease is renewed while it is held and given back when the hold ends, always."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from sidecar.tokens.lock import RedisRefreshCoordinator
from sidecar.tokens.redis_store import RedisTokenStore

ENDS_WITHIN_S = 5.0


@pytest.fixture
def store(redis_token_store: RedisTokenStore) -> RedisTokenStore:
    return redis_token_store


class SwallowingRenewal:
    """A renewal whose reply lands together with its cancellation: Python 3.11's
    ``asyncio.wait_for`` (which redis-py reads replies through) then returns the reply and drops
    the cancellation. Here the reply comes only when cancelled, so the race is certain."""

    def __init__(self) -> None:
        self.in_flight = asyncio.Event()
        self.calls = 0

    async def __call__(self, *, keys: list[Any], args: list[Any]) -> int:
        self.calls += 1
        self.in_flight.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        self.in_flight.clear()
        return 1


async def test_a_hold_ends_and_gives_the_lease_back_when_a_renewal_swallows_its_cancel(
    store: RedisTokenStore,
) -> None:
    coordinator = RedisRefreshCoordinator(store, lock_ttl_s=0.03, max_wait_s=1)  # renew often
    renewal = SwallowingRenewal()
    coordinator._renew = renewal  # type: ignore[assignment]
    try:
        async with asyncio.timeout(ENDS_WITHIN_S):
            async with coordinator.hold("alice"):
                await renewal.in_flight.wait()  # the hold ends while a renewal is at Redis
        assert renewal.calls == 1  # the renewer stopped instead of renewing again
        assert await store.client.exists(store.lock_key("alice")) == 0
    finally:
        await coordinator.close()
