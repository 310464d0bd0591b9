"""A ``TokenStore`` that counts its backend's failures in the metrics, and otherwise delegates.

Wrapped once in ``open_services``, so every caller — the token manager, the readiness check,
a refresh running in the background — is counted, by operation, without any of them knowing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from sidecar.errors import StoreUnavailable
from sidecar.metrics import Metrics
from sidecar.tokens.model import TokenRecord
from sidecar.tokens.store import SealState, TokenStore

T = TypeVar("T")


class CountedStore:
    """``TokenStore`` over ``inner``; each ``StoreUnavailable`` adds one to ``store_errors``."""

    def __init__(self, inner: TokenStore, metrics: Metrics) -> None:
        self.inner = inner
        self.name = inner.name
        self._metrics = metrics

    async def _counted(self, operation: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except StoreUnavailable:
            self._metrics.store_failed(operation)
            raise

    async def get(self, user_key: str) -> TokenRecord | None:
        return await self._counted("get", self.inner.get(user_key))

    async def put(self, user_key: str, record: TokenRecord) -> TokenRecord:
        return await self._counted("put", self.inner.put(user_key, record))

    async def compare_and_set(
        self, user_key: str, expected_version: int, record: TokenRecord
    ) -> TokenRecord | None:
        return await self._counted(
            "compare_and_set", self.inner.compare_and_set(user_key, expected_version, record)
        )

    async def delete(self, user_key: str) -> bool:
        return await self._counted("delete", self.inner.delete(user_key))

    async def compare_and_delete(self, user_key: str, expected_version: int) -> bool:
        return await self._counted(
            "compare_and_delete", self.inner.compare_and_delete(user_key, expected_version)
        )

    async def remember_rotation(self, user_key: str, old_refresh_token: str, ttl_s: float) -> None:
        await self._counted(
            "remember_rotation", self.inner.remember_rotation(user_key, old_refresh_token, ttl_s)
        )

    async def was_rotated(self, user_key: str, refresh_token: str) -> bool:
        return await self._counted("was_rotated", self.inner.was_rotated(user_key, refresh_token))

    async def scan_user_keys(self) -> AsyncIterator[str]:
        try:
            async for user_key in self.inner.scan_user_keys():
                yield user_key
        except StoreUnavailable:
            self._metrics.store_failed("scan")
            raise

    async def seal_state(self, user_key: str) -> SealState:
        return await self._counted("seal_state", self.inner.seal_state(user_key))

    async def reseal(self, user_key: str) -> bool:
        return await self._counted("reseal", self.inner.reseal(user_key))

    async def user_keys_for_quota_user(self, quota_user_id: str) -> list[str]:
        return await self._counted(
            "user_keys_for_quota_user", self.inner.user_keys_for_quota_user(quota_user_id)
        )

    async def claim_event(self, event_id: str, ttl_s: float) -> bool:
        return await self._counted("claim_event", self.inner.claim_event(event_id, ttl_s))

    async def release_event(self, event_id: str) -> None:
        await self._counted("release_event", self.inner.release_event(event_id))

    async def remember_connect(self, state: str, payload: bytes, ttl_s: float) -> None:
        await self._counted("remember_connect", self.inner.remember_connect(state, payload, ttl_s))

    async def take_connect(self, state: str) -> bytes | None:
        return await self._counted("take_connect", self.inner.take_connect(state))

    async def ping(self) -> None:
        await self._counted("ping", self.inner.ping())

    async def close(self) -> None:
        await self.inner.close()
