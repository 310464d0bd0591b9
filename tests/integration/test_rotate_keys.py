"""Key rotation: ``rotate_keys`` and ``quota-sidecar rotate-keys`` on a real Redis (and cluster).

The scenario of every test is the operator procedure of ``sidecar.tokens.rotate``: records were
sealed under ``old``; the replicas now run the ring ``[new, old]``; rotation moves every record
to ``new`` so that ``old`` can be dropped.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from sidecar.tokens.crypto import Sealer
from sidecar.tokens.factory import create_store
from sidecar.tokens.memory import MemoryTokenStore
from sidecar.tokens.model import TokenRecord
from sidecar.tokens.redis_store import RedisClient, RedisTokenStore
from sidecar.tokens.rotate import RESEAL_ATTEMPTS, rotate_keys
from sidecar.tokens.store import SealState, TokenStore
from tests.integration.test_token_store_contract import (
    closed_loopback_port,
    make_record,
    new_user_key,
)

CLI_TIMEOUT_S = 60


@dataclass
class Keys:
    old: bytes
    new: bytes

    @property
    def old_only(self) -> Sealer:
        return Sealer([self.old])

    @property
    def ring(self) -> Sealer:
        return Sealer([self.new, self.old])

    @property
    def new_only(self) -> Sealer:
        return Sealer([self.new])

    def env_value(self) -> str:
        """``tokens.encryption_keys`` as one environment variable: base64url, space-separated."""
        return " ".join(base64.urlsafe_b64encode(key).decode() for key in (self.new, self.old))


@dataclass
class Target:
    """Where the records live: a Redis URL, the key prefix of this test, a raw client."""

    url: str
    prefix: str
    client: RedisClient

    def store(self, sealer: Sealer) -> RedisTokenStore:
        store = create_store(self.url, sealer, prefix=self.prefix)
        assert isinstance(store, RedisTokenStore)
        return store

    async def blob(self, user_key: str) -> bytes:
        blob = await self.client.hget(f"{self.prefix}:{{{user_key}}}:tokens", "b")
        assert isinstance(blob, bytes)
        return blob


@pytest.fixture
def keys() -> Keys:
    return Keys(old=secrets.token_bytes(32), new=secrets.token_bytes(32))


@pytest.fixture(params=["redis", "redis-cluster"])
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == "redis-cluster":
        names = ("redis_cluster_url", "redis_cluster_prefix", "redis_cluster_client")
    else:
        names = ("redis_url", "redis_prefix", "redis_client")
    return Target(*(request.getfixturevalue(name) for name in names))


@pytest.fixture
async def stores(target: Target) -> AsyncIterator[Callable[[Sealer], RedisTokenStore]]:
    """``stores(sealer)``: a store on the target with that key ring, closed after the test."""
    opened: list[RedisTokenStore] = []

    def open_store(sealer: Sealer) -> RedisTokenStore:
        opened.append(target.store(sealer))
        return opened[-1]

    yield open_store
    for store in opened:
        await store.close()


async def seed(store: TokenStore, count: int) -> dict[str, TokenRecord]:
    return {
        user: await store.put(user, make_record())
        for user in (new_user_key() for _ in range(count))
    }


# --- rotate_keys ----------------------------------------------------------------------------------


async def test_records_sealed_under_the_old_key_open_with_the_ring_new_then_old(
    keys: Keys, stores: Callable[[Sealer], RedisTokenStore]
) -> None:
    written = await seed(stores(keys.old_only), 3)
    ring_store = stores(keys.ring)
    for user, record in written.items():
        assert await ring_store.get(user) == record


async def test_after_rotate_keys_no_record_is_left_under_the_old_key_and_all_open_with_the_new_alone(
    keys: Keys, target: Target, stores: Callable[[Sealer], RedisTokenStore]
) -> None:
    under_old = await seed(stores(keys.old_only), 12)
    ring_store = stores(keys.ring)
    under_new = await seed(ring_store, 3)
    unreadable = await seed(stores(Sealer([secrets.token_bytes(32)])), 1)  # a key not in the ring

    report = await rotate_keys(ring_store)

    assert (report.scanned, report.resealed, report.already_primary) == (16, 12, 3)
    assert (report.unreadable, report.gone, report.busy) == (1, 0, 0)
    new_id = keys.ring.primary_key_id
    for user in [*under_old, *under_new]:
        assert keys.ring.key_id_of(await target.blob(user)) == new_id
    new_only = stores(keys.new_only)
    for user, record in {**under_old, **under_new}.items():
        assert await new_only.get(user) == record, "same tokens and same version, new key"
    [stranger] = unreadable
    assert await ring_store.seal_state(stranger) is SealState.UNREADABLE, "left as is"


async def test_a_second_run_finds_everything_already_under_the_primary_key(
    keys: Keys, stores: Callable[[Sealer], RedisTokenStore]
) -> None:
    await seed(stores(keys.old_only), 4)
    ring_store = stores(keys.ring)
    assert (await rotate_keys(ring_store)).resealed == 4

    again = await rotate_keys(ring_store)

    assert (again.scanned, again.resealed, again.already_primary) == (4, 0, 4)


async def test_a_refresh_that_read_the_record_before_the_rotation_still_writes_after_it(
    keys: Keys, stores: Callable[[Sealer], RedisTokenStore]
) -> None:
    [user] = await seed(stores(keys.old_only), 1)
    replica = stores(keys.ring)
    read_by_refresh = await replica.get(user)  # replica A: re-read under the lock, calls Quota…
    assert read_by_refresh is not None

    assert (await rotate_keys(stores(keys.ring))).resealed == 1
    refreshed = make_record(access_token="at-refreshed")
    written = await replica.compare_and_set(user, read_by_refresh.version, refreshed)

    assert written is not None, "re-sealing kept the version the refresh compares against"
    assert await stores(keys.new_only).get(user) == written


async def test_a_dry_run_counts_what_would_be_resealed_and_changes_nothing(
    keys: Keys, target: Target, stores: Callable[[Sealer], RedisTokenStore]
) -> None:
    written = await seed(stores(keys.old_only), 5)
    before = {user: await target.blob(user) for user in written}

    report = await rotate_keys(stores(keys.ring), dry_run=True)

    assert (report.dry_run, report.scanned, report.resealed) == (True, 5, 5)
    assert {user: await target.blob(user) for user in written} == before


class SealerWithARefreshInBetween(Sealer):
    """Lands one "refresh" (a new version) in Redis between a reseal's read and its write."""

    def __init__(self, keys: list[bytes], refresh: Callable[[], None]) -> None:
        super().__init__(keys)
        self.refresh: Callable[[], None] | None = refresh

    def seal(self, user_key: str, plaintext: bytes) -> bytes:
        if self.refresh is not None:
            refresh, self.refresh = self.refresh, None
            refresh()
        return super().seal(user_key, plaintext)


async def test_a_reseal_writes_nothing_when_a_refresh_lands_between_its_read_and_its_write(
    keys: Keys, redis_url: str, redis_prefix: str
) -> None:
    seeded = create_store(redis_url, keys.old_only, prefix=redis_prefix)
    [user] = await seed(seeded, 1)
    await seeded.close()
    tokens_key = f"{redis_prefix}:{{{user}}}:tokens"

    def refresh() -> None:
        with redis.Redis.from_url(redis_url) as client:
            client.hset(tokens_key, "v", "4242")

    sealer = SealerWithARefreshInBetween([keys.new, keys.old], refresh)
    store = create_store(redis_url, sealer, prefix=redis_prefix)
    try:
        assert await store.reseal(user) is False, "the version moved: nothing written"
        assert await store.seal_state(user) is SealState.OLDER_KEY
        assert await store.reseal(user) is True, "the next attempt finds it quiet"
        record = await store.get(user)
        assert record is not None
        assert record.version == 4242
    finally:
        await store.close()


async def test_rotate_keys_looks_again_after_losing_a_race_with_a_refresh(
    keys: Keys, redis_url: str, redis_prefix: str
) -> None:
    seeded = create_store(redis_url, keys.old_only, prefix=redis_prefix)
    [user] = await seed(seeded, 1)
    await seeded.close()

    def refresh() -> None:
        with redis.Redis.from_url(redis_url) as client:
            client.hset(f"{redis_prefix}:{{{user}}}:tokens", "v", "4242")

    store = create_store(
        redis_url, SealerWithARefreshInBetween([keys.new, keys.old], refresh), prefix=redis_prefix
    )
    try:
        report = await rotate_keys(store)
    finally:
        await store.close()

    assert (report.scanned, report.resealed, report.busy) == (1, 1, 0)


class AlwaysRefreshedStore(MemoryTokenStore):
    """A record that a replica on the old ring keeps rewriting under the old key."""

    async def seal_state(self, user_key: str) -> SealState:
        return SealState.OLDER_KEY

    async def reseal(self, user_key: str) -> bool:
        return False


async def test_rotate_keys_counts_a_record_that_keeps_changing_as_busy_after_a_few_attempts(
    keys: Keys,
) -> None:
    store = AlwaysRefreshedStore(keys.ring)
    await store.put(new_user_key(), make_record())

    report = await rotate_keys(store)

    assert (report.scanned, report.resealed, report.busy) == (1, 0, 1)
    assert RESEAL_ATTEMPTS > 1


class DisconnectedAfterTheScanStore(MemoryTokenStore):
    """Lists one user more than it holds, as when a user disconnects during the scan."""

    async def scan_user_keys(self) -> AsyncIterator[str]:
        async for user_key in super().scan_user_keys():
            yield user_key
        yield new_user_key()


async def test_rotate_keys_counts_a_record_deleted_after_the_scan_as_gone(keys: Keys) -> None:
    store = DisconnectedAfterTheScanStore(keys.ring)
    await store.put(new_user_key(), make_record())

    report = await rotate_keys(store)

    assert (report.scanned, report.already_primary, report.gone) == (2, 1, 1)


# --- quota-sidecar rotate-keys ------------------------------------------------------------------


def run_cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {
        "PATH": os.environ.get("PATH", ""),
        "QUOTA_CLIENT_ID": "c",
        "QUOTA_CLIENT_SECRET": "s",
        "SESSION_SECRET": "x" * 32,
        "QUOTA_SIDECAR__LOG__FORMAT": "text",
    }
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "rotate-keys", *args],
        capture_output=True,
        text=True,
        env={**base, **env},
        cwd=cwd,  # no config/sidecar.yaml there: the environment is the whole configuration
        check=False,
        timeout=CLI_TIMEOUT_S,
    )


@pytest.fixture
async def redis_target(redis_url: str, redis_prefix: str, redis_client: RedisClient) -> Target:
    return Target(redis_url, redis_prefix, redis_client)


async def test_the_rotate_keys_command_reseals_every_record_under_the_new_key(
    keys: Keys, redis_target: Target, tmp_path: Path
) -> None:
    seeded = redis_target.store(keys.old_only)
    written = await seed(seeded, 3)
    await seeded.close()

    result = run_cli(
        tmp_path,
        REDIS_URL=redis_target.url,
        QUOTA_SIDECAR__TOKENS__KEY_PREFIX=redis_target.prefix,
        QUOTA_SIDECAR__TOKENS__ENCRYPTION_KEYS=keys.env_value(),
    )

    assert result.returncode == 0, result.stderr
    assert "scanned 3 token record(s): 3 re-sealed" in result.stdout
    assert keys.ring.primary_key_id in result.stdout
    for user in written:
        assert keys.ring.key_id_of(await redis_target.blob(user)) == keys.ring.primary_key_id
    store = redis_target.store(keys.new_only)
    try:
        for user, record in written.items():
            assert await store.get(user) == record
    finally:
        await store.close()


async def test_the_rotate_keys_command_with_dry_run_changes_nothing(
    keys: Keys, redis_target: Target, tmp_path: Path
) -> None:
    seeded = redis_target.store(keys.old_only)
    written = await seed(seeded, 2)
    await seeded.close()
    before = {user: await redis_target.blob(user) for user in written}

    result = run_cli(
        tmp_path,
        "--dry-run",
        REDIS_URL=redis_target.url,
        QUOTA_SIDECAR__TOKENS__KEY_PREFIX=redis_target.prefix,
        QUOTA_SIDECAR__TOKENS__ENCRYPTION_KEYS=keys.env_value(),
    )

    assert result.returncode == 0, result.stderr
    assert "2 would be re-sealed" in result.stdout
    assert {user: await redis_target.blob(user) for user in written} == before


def test_the_rotate_keys_command_refuses_the_memory_store(tmp_path: Path) -> None:
    result = run_cli(tmp_path)
    assert result.returncode == 2
    assert "'memory'" in result.stderr
    assert "inside each running sidecar process" in result.stderr


def test_the_rotate_keys_command_exits_1_when_redis_is_unreachable(tmp_path: Path) -> None:
    result = run_cli(tmp_path, REDIS_URL=f"redis://127.0.0.1:{closed_loopback_port()}/0")
    assert result.returncode == 1
    assert "the token store is unavailable" in result.stderr
    assert "ConnectionError" in result.stderr


def test_the_rotate_keys_command_explains_itself_in_help(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "--help")
    assert result.returncode == 0
    assert "usage: quota-sidecar rotate-keys" in result.stdout
    assert "--dry-run" in result.stdout
