"""Per-user guards on /v1 calls: how many one user may have open, and how much they may spend.

    base.py          the ``UserGuards`` contract, the limits and the spend window
    memory.py        counts in this process (the memory token store)
    redis_guards.py  counts in Redis, shared by every replica (a Redis token store)
    metered.py       one /v1 call: admitted, its usage read, counted, announced, released

``create_guards`` picks the implementation that matches the token store; ``None`` when every
guard is off, so the forwarder does no guard work at all.
"""

from __future__ import annotations

from collections.abc import Callable

from sidecar.config import GuardsConfig
from sidecar.guards.base import Limits, UserGuards
from sidecar.guards.memory import MemoryUserGuards
from sidecar.metrics import Metrics
from sidecar.tokens.factory import redis_store_of
from sidecar.tokens.store import TokenStore

# RedisUserGuards is not re-exported: importing it imports redis-py, which a sidecar with the
# memory store never needs (import it from sidecar.guards.redis_guards).
__all__ = ["Limits", "MemoryUserGuards", "UserGuards", "create_guards"]


def create_guards(
    config: GuardsConfig, store: TokenStore, *, clock: Callable[[], float], metrics: Metrics
) -> UserGuards | None:
    """Guards kept where the tokens are: Redis for a Redis store, else this process."""
    limits = Limits.of(config)
    if not limits.any:
        return None
    redis_store = redis_store_of(store)
    if redis_store is not None:
        from sidecar.guards.redis_guards import RedisUserGuards  # imports redis-py

        return RedisUserGuards(
            redis_store.client, limits, prefix=redis_store.prefix, clock=clock, metrics=metrics
        )
    return MemoryUserGuards(limits, clock=clock, metrics=metrics)
