"""A Redis token store: one sealed record per user in a hash, written with compare-and-set.

Layout, for ``user_key`` (an HMAC of the user id, never the id itself)::

    <prefix>:{<user_key>}:tokens             hash  v = version (decimal), b = sealed blob (bytes)
    <prefix>:{<user_key>}:lock               the cross-replica refresh lock (the refresh logic's)
    <prefix>:{<user_key>}:rotated:<sha256>   "1", expiring: a refresh token spent lately
    <prefix>:q:{<sha256 of quota user id>}   hash  user_key -> unix time it was indexed
    <prefix>:evt:{<sha256 of event id>}      "1", expiring: a webhook event already handled
    <prefix>:connect:{<sha256 of state>}     sealed pending connect, expiring, taken once

The braces are a Redis Cluster hash tag: every key of a user lands in the same slot, and every
script here takes exactly one key, so the same code runs on a standalone server, behind
Sentinel, and on a cluster (``client`` is a ``Redis`` or a ``RedisCluster``).

The Quota-user index lives in its own slot, so it is kept with separate commands, never with a
script spanning two slots: ``put`` (a connect, where the id is new) indexes first, then writes
the record; ``compare_and_set`` (a refresh or a status note, same id) renews the entry after its
write; a delete removes it. The reader verifies each candidate's record (``sidecar.tokens.store``). An entry is removed only when it is
older than ``INDEX_PRUNE_AFTER_S`` and still holds the time the remover saw (a one-key script),
so an entry a write in flight has just renewed is never lost::

    connect (replica A):  HSET q k t2 ……………………………………………… write record k (q)
    lookup  (replica B):  HGETALL q → k: t1 (old); get k → other id;  prune if HGET q k == t1
                          → t2 ≠ t1: kept (had the prune come first, A's HSET re-adds it)

Compare-and-set runs as a Lua script so the read of ``v`` and the write are one step on the
server. Without it, two replicas refreshing the same user would race::

    replica A: HGET v -> v1
    replica B: HGET v -> v1
    replica A: HSET v2 (A's new tokens)
    replica B: HSET v3 (B's tokens, overwriting A's; A's caller now holds tokens not stored)

With the script, B's write finds ``v2 != v1`` and changes nothing.

Re-sealing (key rotation) is a compare-and-set too, but it keeps ``v``: it stores the same
tokens under the primary key, and must not fail a refresh that is already in flight::

    replica A:   (holds the lock) HGET v -> v1, calls Quota …
    rotate-keys: HMGET v b -> v1, old-key blob; RESEAL(v1, new-key blob) -> b replaced, v = v1
    replica A:   CAS(v1 -> v2) ✓  (had re-sealing bumped v, A's new tokens would be lost)

and if the refresh lands first, the re-seal finds ``v2 != v1`` and writes nothing (the refresh
already sealed under the primary key).

Errors: every ``RedisError``, ``RedisClusterException`` (which redis-py does not derive from
``RedisError``: "cluster cannot be connected", "slot not covered") and ``OSError`` becomes
``StoreUnavailable`` here, with the exception's class and message as operator detail. On that
path nothing is deleted or changed by this store; callers keep what they had.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeAlias

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError

from sidecar.errors import StoreUnavailable
from sidecar.tokens.crypto import Sealer, SealError
from sidecar.tokens.model import TokenRecord
from sidecar.tokens.store import (
    INDEX_PRUNE_AFTER_S,
    SealState,
    connect_seal_label,
    fingerprint,
    rotation_fingerprint,
    seal_state_of,
)

logger = logging.getLogger(__name__)

RedisClient: TypeAlias = aioredis.Redis | aioredis.RedisCluster
# Everything a Redis client of any topology raises when Redis cannot serve (see the docstring).
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)

SCAN_COUNT = 500  # keys per SCAN round trip: few round trips, no long server pauses
_VERSION_BITS = 63  # fits Redis's and Lua's integer handling as a decimal string
_DETAIL_MAX_CHARS = 300
_GLOB_SPECIALS = re.compile(r"([\\*?\[\]])")

# Every script that changes a record also PUBLISHes on the user's change channel (its last ARGV):
# the notice wakes lock waiters and drops other replicas' cached copies, in the write's own round
# trip. PUBLISH names no key, so a script may send it on a cluster too (it reaches every node).

# KEYS[1] = tokens key; ARGV = new version, blob, ttl in ms (0 = none), change channel. A script,
# so that the write and its expiry are one step, done the same way on every topology.
_PUT = """
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'b', ARGV[2])
local ttl_ms = tonumber(ARGV[3])
if ttl_ms > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
end
redis.call('PUBLISH', ARGV[4], '1')
return 1
"""

# KEYS[1] = tokens key; ARGV = expected version, new version, blob, ttl in ms (0 = none),
# change channel. HGET on a missing key gives false, which never equals the expected string: no
# resurrection.
_COMPARE_AND_SET = """
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'b', ARGV[3])
local ttl_ms = tonumber(ARGV[4])
if ttl_ms > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
end
redis.call('PUBLISH', ARGV[5], '1')
return 1
"""

# KEYS[1] = tokens key; ARGV = expected version, change channel. Returns the deleted blob (its
# quota user id is unindexed next), or false when nothing was deleted.
_COMPARE_AND_DELETE = """
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then
  return false
end
local blob = redis.call('HGET', KEYS[1], 'b')
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], '1')
return blob
"""

# KEYS[1] = tokens key; ARGV[1] = change channel. Returns the deleted blob, or false when there
# was none.
_DELETE = """
local blob = redis.call('HGET', KEYS[1], 'b')
if redis.call('DEL', KEYS[1]) == 0 then
  return false
end
redis.call('PUBLISH', ARGV[1], '1')
return blob or ''
"""

# KEYS[1] = index key; ARGV = user key, unix time now, ttl in ms (0 = none).
_INDEX_ADD = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local ttl_ms = tonumber(ARGV[3])
if ttl_ms > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
end
return 1
"""

# KEYS[1] = index key; ARGV = user key, the time the caller saw (or "" for any), cutoff time.
# Removes the entry only if it is older than the cutoff and unchanged since it was read.
_INDEX_PRUNE = """
local seen = redis.call('HGET', KEYS[1], ARGV[1])
if not seen then
  return 0
end
if ARGV[2] ~= '' and seen ~= ARGV[2] then
  return 0
end
if tonumber(seen) == nil or tonumber(seen) >= tonumber(ARGV[3]) then
  return 0
end
return redis.call('HDEL', KEYS[1], ARGV[1])
"""

# KEYS[1] = pending connect key. GET and DEL in one step (GETDEL needs Redis 6.2).
_TAKE = """
local value = redis.call('GET', KEYS[1])
if value then
  redis.call('DEL', KEYS[1])
end
return value
"""

# KEYS[1] = tokens key; ARGV = expected version, the same payload sealed under the primary key.
# Only ``b`` changes: the version (and any expiry) stay, see the module docstring.
_RESEAL = """
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'b', ARGV[2])
return 1
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
    except REDIS_ERRORS as exc:
        # redis-py's messages name the host and the failure, never the password.
        detail = f"redis {operation}: {type(exc).__name__}: {exc}"[:_DETAIL_MAX_CHARS]
        raise StoreUnavailable(detail=detail) from exc


class RedisTokenStore:
    """``TokenStore`` on Redis: standalone, Sentinel-managed or Cluster (any asyncio client)."""

    name = "redis"

    def __init__(
        self,
        client: RedisClient,
        sealer: Sealer,
        *,
        prefix: str = "quota-sidecar",
        record_ttl_s: int | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``on_close`` releases what the client depends on but does not own (Sentinel's own
        connections to the sentinels); it runs after the client is closed. ``clock`` stamps
        index entries (wall time: replicas compare each other's stamps)."""
        if record_ttl_s is not None and record_ttl_s <= 0:
            raise ValueError("record_ttl_s must be a positive number of seconds, or None")
        self._client = client
        self._sealer = sealer
        self._prefix = prefix
        self._ttl_ms = 0 if record_ttl_s is None else record_ttl_s * 1000
        self._on_close = on_close
        self._clock = clock
        # Registering computes the SHA only; the script is loaded on first use (no I/O here).
        # redis-py's AsyncScript works on both clients: EVALSHA routes by the key on a cluster,
        # and on NOSCRIPT it loads the script (on every primary) and retries once.
        self._put = self._script(_PUT)
        self._cas = self._script(_COMPARE_AND_SET)
        self._cad = self._script(_COMPARE_AND_DELETE)
        self._reseal = self._script(_RESEAL)
        self._delete = self._script(_DELETE)
        self._index_add = self._script(_INDEX_ADD)
        self._index_prune = self._script(_INDEX_PRUNE)
        self._take = self._script(_TAKE)

    def _script(self, source: str) -> AsyncScript:
        return self._client.register_script(source)

    @property
    def client(self) -> RedisClient:
        """The Redis client, shared with the refresh lock (same server, same failure modes)."""
        return self._client

    @property
    def prefix(self) -> str:
        return self._prefix

    def tokens_key(self, user_key: str) -> str:
        return f"{self._prefix}:{{{user_key}}}:tokens"

    def changed_channel(self, user_key: str) -> str:
        """Where every change to the user's record is announced (see the write scripts)."""
        return f"{self._prefix}:{{{user_key}}}:changed"

    @property
    def changed_pattern(self) -> str:
        """The pattern of every user's change channel."""
        return f"{self._prefix}:{{*}}:changed"

    def lock_key(self, user_key: str) -> str:
        return f"{self._prefix}:{{{user_key}}}:lock"

    def rotated_key(self, user_key: str, refresh_token: str) -> str:
        return f"{self._prefix}:{{{user_key}}}:rotated:{rotation_fingerprint(refresh_token)}"

    def quota_user_key(self, quota_user_id: str) -> str:
        """The index of one Quota user id (hashed: Redis holds no Quota id in clear)."""
        return f"{self._prefix}:q:{{{fingerprint(quota_user_id)}}}"

    def event_key(self, event_id: str) -> str:
        return f"{self._prefix}:evt:{{{fingerprint(event_id)}}}"

    def connect_key(self, state: str) -> str:
        return f"{self._prefix}:connect:{{{fingerprint(state)}}}"

    async def get(self, user_key: str) -> TokenRecord | None:
        try:
            stored = await self._read(user_key, "get")
            if stored is None:
                return None
            version, blob = stored
            return self._sealer.open_record(user_key, blob, version=version)
        except SealError as exc:
            _log_unreadable(user_key, exc, "treating it as absent")
            return None

    async def put(self, user_key: str, record: TokenRecord) -> TokenRecord:
        version = _new_version()
        blob = self._sealer.seal_record(user_key, record)
        await self._index(user_key, record, "put")
        with _unavailable_on_error("put"):
            await self._put(
                keys=[self.tokens_key(user_key)],
                args=[str(version), blob, self._ttl_ms, self.changed_channel(user_key)],
            )
        return record.with_version(version)

    async def compare_and_set(
        self, user_key: str, expected_version: int, record: TokenRecord
    ) -> TokenRecord | None:
        version = _new_version(avoid=expected_version)
        blob = self._sealer.seal_record(user_key, record)
        with _unavailable_on_error("compare_and_set"):
            written = await self._cas(
                keys=[self.tokens_key(user_key)],
                args=[
                    str(expected_version),
                    str(version),
                    blob,
                    self._ttl_ms,
                    self.changed_channel(user_key),
                ],
            )
        if int(written) != 1:
            return None
        # After the write, not before: a refresh's new pair must be stored in one round trip
        # after Quota answers. A compare-and-set keeps the Quota user id of the record it
        # replaces (a refresh, a status note), so this only renews the entry and its expiry.
        try:
            await self._index(user_key, record, "compare_and_set")
        except StoreUnavailable as exc:
            logger.warning("could not renew a Quota-user index entry: %s", exc.detail)
        return record.with_version(version)

    async def delete(self, user_key: str) -> bool:
        with _unavailable_on_error("delete"):
            blob = await self._delete(
                keys=[self.tokens_key(user_key)], args=[self.changed_channel(user_key)]
            )
        if blob is None:
            return False
        await self._unindex(user_key, blob)
        return True

    async def compare_and_delete(self, user_key: str, expected_version: int) -> bool:
        with _unavailable_on_error("compare_and_delete"):
            blob = await self._cad(
                keys=[self.tokens_key(user_key)],
                args=[str(expected_version), self.changed_channel(user_key)],
            )
        if blob is None:
            return False
        await self._unindex(user_key, blob)
        return True

    async def remember_rotation(self, user_key: str, old_refresh_token: str, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be a positive number of seconds")
        key = self.rotated_key(user_key, old_refresh_token)
        with _unavailable_on_error("remember_rotation"):
            await self._client.set(key, b"1", px=max(1, round(ttl_s * 1000)))

    async def was_rotated(self, user_key: str, refresh_token: str) -> bool:
        with _unavailable_on_error("was_rotated"):
            found = await self._client.exists(self.rotated_key(user_key, refresh_token))
        return int(found) > 0

    async def scan_user_keys(self) -> AsyncIterator[str]:
        head, tail = f"{self._prefix}:{{", "}:tokens"
        escaped_prefix = _GLOB_SPECIALS.sub(r"\\\1", self._prefix)  # MATCH is a glob
        pattern = f"{escaped_prefix}:{{*}}:tokens"
        with _unavailable_on_error("scan"):
            async for raw in self._scan(pattern):
                key = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                user_key = key[len(head) : -len(tail)]
                if key.startswith(head) and key.endswith(tail) and _is_hash_tag(user_key):
                    yield user_key

    def _scan(self, pattern: str) -> AsyncIterator[bytes | str]:
        """SCAN every node that holds data: the server, or each primary of a cluster."""
        if isinstance(self._client, aioredis.RedisCluster):
            return self._client.scan_iter(
                match=pattern, count=SCAN_COUNT, target_nodes=aioredis.RedisCluster.PRIMARIES
            )
        return self._client.scan_iter(match=pattern, count=SCAN_COUNT)

    async def seal_state(self, user_key: str) -> SealState:
        try:
            stored = await self._read(user_key, "seal_state")
        except SealError:
            return SealState.UNREADABLE
        if stored is None:
            return SealState.ABSENT
        return seal_state_of(self._sealer, user_key, stored[1])

    async def reseal(self, user_key: str) -> bool:
        try:
            stored = await self._read(user_key, "reseal")
        except SealError as exc:
            _log_unreadable(user_key, exc, "leaving it as is")
            return False
        if stored is None:
            return False
        version, blob = stored
        try:
            plaintext = self._sealer.open(user_key, blob)
        except SealError as exc:
            _log_unreadable(user_key, exc, "leaving it as is")
            return False
        if self._sealer.key_id_of(blob) == self._sealer.primary_key_id:
            return False
        resealed = self._sealer.seal(user_key, plaintext)
        with _unavailable_on_error("reseal"):
            written = await self._reseal(
                keys=[self.tokens_key(user_key)], args=[str(version), resealed]
            )
        return int(written) == 1

    async def user_keys_for_quota_user(self, quota_user_id: str) -> list[str]:
        index = self.quota_user_key(quota_user_id)
        with _unavailable_on_error("user_keys_for_quota_user"):
            entries = await self._client.hgetall(index)
        found = []
        cutoff = self._clock() - INDEX_PRUNE_AFTER_S
        for raw_key, raw_seen in entries.items():
            user_key = _text(raw_key)
            record = await self.get(user_key)
            if record is not None and record.quota_user_id == quota_user_id:
                found.append(user_key)
                continue
            with _unavailable_on_error("user_keys_for_quota_user"):
                await self._index_prune(keys=[index], args=[user_key, _text(raw_seen), cutoff])
        return sorted(found)

    async def claim_event(self, event_id: str, ttl_s: float) -> bool:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be a positive number of seconds")
        with _unavailable_on_error("claim_event"):
            claimed = await self._client.set(
                self.event_key(event_id), b"1", nx=True, px=max(1, round(ttl_s * 1000))
            )
        return bool(claimed)

    async def release_event(self, event_id: str) -> None:
        with _unavailable_on_error("release_event"):
            await self._client.delete(self.event_key(event_id))

    async def remember_connect(self, state: str, payload: bytes, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be a positive number of seconds")
        blob = self._sealer.seal(connect_seal_label(state), payload)
        with _unavailable_on_error("remember_connect"):
            await self._client.set(self.connect_key(state), blob, px=max(1, round(ttl_s * 1000)))

    async def take_connect(self, state: str) -> bytes | None:
        with _unavailable_on_error("take_connect"):
            blob = await self._take(keys=[self.connect_key(state)])
        if not isinstance(blob, bytes):
            return None
        try:
            return self._sealer.open(connect_seal_label(state), blob)
        except SealError as exc:
            logger.warning("a pending connect does not open, treating it as absent: %s", exc)
            return None

    async def ping(self) -> None:
        with _unavailable_on_error("ping"):
            await self._client.ping()

    async def close(self) -> None:
        with _unavailable_on_error("close"):
            try:
                await self._client.aclose()
            finally:
                if self._on_close is not None:
                    await self._on_close()

    async def _index(self, user_key: str, record: TokenRecord, operation: str) -> None:
        """Index ``record``'s Quota user id before the record is written (see the docstring)."""
        if record.quota_user_id is None:
            return
        with _unavailable_on_error(operation):
            await self._index_add(
                keys=[self.quota_user_key(record.quota_user_id)],
                args=[user_key, repr(self._clock()), self._ttl_ms],
            )

    async def _unindex(self, user_key: str, blob: bytes | str) -> None:
        """After a delete: drop the deleted record's index entry unless a write just renewed it."""
        if not isinstance(blob, bytes) or not blob:
            return
        try:
            record = self._sealer.open_record(user_key, blob, version=1)
        except SealError:
            return  # unreadable: a lookup prunes its entry, if it has one, in time
        if record.quota_user_id is None:
            return
        cutoff = self._clock() - INDEX_PRUNE_AFTER_S
        with _unavailable_on_error("unindex"):
            await self._index_prune(
                keys=[self.quota_user_key(record.quota_user_id)], args=[user_key, "", cutoff]
            )

    async def _read(self, user_key: str, operation: str) -> tuple[int, bytes] | None:
        """The stored version and blob, ``None`` if absent; ``SealError`` if malformed."""
        with _unavailable_on_error(operation):
            raw_version, blob = await self._client.hmget(self.tokens_key(user_key), ["v", "b"])
        if raw_version is None or blob is None:
            return None
        if not isinstance(blob, bytes):
            raise SealError("stored blob is text; the client must not decode responses")
        return _parse_version(raw_version), blob


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _is_hash_tag(text: str) -> bool:
    return bool(text) and "{" not in text and "}" not in text


def _log_unreadable(user_key: str, exc: SealError, outcome: str) -> None:
    logger.warning(
        "token record for user key %s… does not open, %s: %s", user_key[:12], outcome, exc
    )


def _parse_version(raw: bytes | str) -> int:
    try:
        version = int(raw)
    except ValueError:
        raise SealError("stored version is not a decimal integer") from None
    if version == 0:
        raise SealError("stored version is zero, which no write produces")
    return version
