"""A Redis token store: one sealed record per user in a hash, written with compare-and-set.

Layout, for ``user_key`` (an HMAC of the user id, never the id itself)::

    <prefix>:{<user_key>}:tokens   hash  v = version (decimal), b = sealed blob (bytes)
    <prefix>:{<user_key>}:lock     the cross-replica refresh lock (owned by the refresh logic)

The braces are a Redis Cluster hash tag: both keys of a user land in the same slot, so scripts
that touch them stay legal on a cluster.

Compare-and-set runs as a Lua script so the read of ``v`` and the write are one step on the
server. Without it, two replicas refreshing the same user would race::

    replica A: HGET v -> v1
    replica B: HGET v -> v1
    replica A: HSET v2 (A's new tokens)
    replica B: HSET v3 (B's tokens, overwriting A's; A's caller now holds tokens not stored)

With the script, B's write finds ``v2 != v1`` and changes nothing.

Errors: every ``RedisError`` and ``OSError`` (refused, timed out, cluster down, auth…) becomes
``StoreUnavailable`` here, with the exception's class and message as operator detail. On that
path nothing is deleted or changed by this store; callers keep what they had.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from sidecar.errors import StoreUnavailable
from sidecar.tokens.crypto import Sealer, SealError
from sidecar.tokens.model import TokenRecord

logger = logging.getLogger(__name__)

_VERSION_BITS = 63  # fits Redis's and Lua's integer handling as a decimal string
_DETAIL_MAX_CHARS = 300

# KEYS[1] = tokens key; ARGV = expected version, new version, blob, ttl in ms (0 = none).
# HGET on a missing key gives false, which never equals the expected string: no resurrection.
_COMPARE_AND_SET = """
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'b', ARGV[3])
local ttl_ms = tonumber(ARGV[4])
if ttl_ms > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
end
return 1
"""

# KEYS[1] = tokens key; ARGV[1] = expected version.
_COMPARE_AND_DELETE = """
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then
  return 0
end
return redis.call('DEL', KEYS[1])
"""


def _new_version(avoid: int | None = None) -> int:
    """A random non-zero version; random so a delete then a put never repeats an old one."""
    while True:
        version = secrets.randbits(_VERSION_BITS)
        if version != 0 and version != avoid:
            return version


@contextmanager
def _unavailable_on_error(operation: str) -> Iterator[None]:
    """Translate Redis and socket failures into ``StoreUnavailable`` (the store's boundary)."""
    try:
        yield
    except (RedisError, OSError) as exc:
        # redis-py's messages name the host and the failure, never the password.
        detail = f"redis {operation}: {type(exc).__name__}: {exc}"[:_DETAIL_MAX_CHARS]
        raise StoreUnavailable(detail=detail) from exc


class RedisTokenStore:
    """``TokenStore`` on a Redis server (standalone or through any redis-py asyncio client)."""

    name = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        sealer: Sealer,
        *,
        prefix: str = "quota-sidecar",
        record_ttl_s: int | None = None,
    ) -> None:
        if record_ttl_s is not None and record_ttl_s <= 0:
            raise ValueError("record_ttl_s must be a positive number of seconds, or None")
        self._client = client
        self._sealer = sealer
        self._prefix = prefix
        self._ttl_ms = 0 if record_ttl_s is None else record_ttl_s * 1000
        # Registering computes the SHA only; the script is loaded on first use (no I/O here).
        self._cas = client.register_script(_COMPARE_AND_SET)
        self._cad = client.register_script(_COMPARE_AND_DELETE)

    @property
    def client(self) -> aioredis.Redis:
        """The Redis client, shared with the refresh lock (same server, same failure modes)."""
        return self._client

    @property
    def prefix(self) -> str:
        return self._prefix

    def tokens_key(self, user_key: str) -> str:
        return f"{self._prefix}:{{{user_key}}}:tokens"

    def lock_key(self, user_key: str) -> str:
        return f"{self._prefix}:{{{user_key}}}:lock"

    async def get(self, user_key: str) -> TokenRecord | None:
        with _unavailable_on_error("get"):
            raw_version, blob = await self._client.hmget(self.tokens_key(user_key), ["v", "b"])
        if raw_version is None or blob is None:
            return None
        try:
            if not isinstance(blob, bytes):
                raise SealError("stored blob is text; the client must not decode responses")
            version = _parse_version(raw_version)
            return self._sealer.open_record(user_key, blob, version=version)
        except SealError as exc:
            logger.warning(
                "token record for user key %s… does not open, treating it as absent: %s",
                user_key[:12],
                exc,
            )
            return None

    async def put(self, user_key: str, record: TokenRecord) -> TokenRecord:
        version = _new_version()
        blob = self._sealer.seal_record(user_key, record)
        key = self.tokens_key(user_key)
        fields: dict[FieldT, EncodableT] = {"v": str(version), "b": blob}
        with _unavailable_on_error("put"):
            if self._ttl_ms:
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.hset(key, mapping=fields)
                    pipe.pexpire(key, self._ttl_ms)
                    await pipe.execute()
            else:
                await self._client.hset(key, mapping=fields)
        return record.with_version(version)

    async def compare_and_set(
        self, user_key: str, expected_version: int, record: TokenRecord
    ) -> TokenRecord | None:
        version = _new_version(avoid=expected_version)
        blob = self._sealer.seal_record(user_key, record)
        with _unavailable_on_error("compare_and_set"):
            written = await self._cas(
                keys=[self.tokens_key(user_key)],
                args=[str(expected_version), str(version), blob, self._ttl_ms],
            )
        return record.with_version(version) if int(written) == 1 else None

    async def delete(self, user_key: str) -> bool:
        with _unavailable_on_error("delete"):
            deleted = await self._client.delete(self.tokens_key(user_key))
        return deleted > 0

    async def compare_and_delete(self, user_key: str, expected_version: int) -> bool:
        with _unavailable_on_error("compare_and_delete"):
            deleted = await self._cad(
                keys=[self.tokens_key(user_key)], args=[str(expected_version)]
            )
        return int(deleted) == 1

    async def ping(self) -> None:
        with _unavailable_on_error("ping"):
            await self._client.ping()

    async def close(self) -> None:
        with _unavailable_on_error("close"):
            await self._client.aclose()


def _parse_version(raw: bytes | str) -> int:
    try:
        version = int(raw)
    except ValueError:
        raise SealError("stored version is not a decimal integer") from None
    if version == 0:
        raise SealError("stored version is zero, which no write produces")
    return version
