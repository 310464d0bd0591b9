"""The token store contract, run against every backend: memory, Redis, and a Redis Cluster.

Redis and the cluster are real servers (see ``tests/conftest.py``). Plus what only Redis can do
wrong: be down, and come back. Those tests reach Redis through a small TCP proxy that the test
stops and restarts, so a real server sits behind a real socket that really breaks.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis

from sidecar.errors import StoreUnavailable
from sidecar.tokens.crypto import Sealer
from sidecar.tokens.factory import create_store
from sidecar.tokens.memory import MemoryTokenStore
from sidecar.tokens.model import TokenRecord
from sidecar.tokens.redis_store import RedisClient, RedisTokenStore
from sidecar.tokens.store import INDEX_PRUNE_AFTER_S, SealState, TokenStore
from tests.support import TcpProxy, through

MakeSealer = Callable[..., Sealer]
GRACE_TTL_S = 0.2  # short enough to wait out in a test
GRACE_WAIT_S = 3.0  # bound on waiting for it to lapse (Redis expires keys lazily + every 100 ms)


def make_record(**overrides: object) -> TokenRecord:
    fields: dict[str, object] = {
        "access_token": "at-" + secrets.token_urlsafe(24),
        "refresh_token": "rt-" + secrets.token_urlsafe(24),
        "expires_at": 1_900_000_000.5,
        "scope": "chat models:read",
        "obtained_at": 1_899_999_000.25,
    }
    fields.update(overrides)
    return TokenRecord(**fields)  # type: ignore[arg-type]


def new_user_key() -> str:
    return secrets.token_hex(32)  # the shape UserKeys.key_for produces


@dataclass
class Backend:
    """A store under test plus raw access to what it keeps, for tests the API cannot express."""

    store: TokenStore
    copy_sealed: Callable[[str, str], Awaitable[None]]  # (from user_key, to user_key)
    raw_bytes: Callable[[str], Awaitable[bytes]]  # the tokens record of a user_key, as stored
    raw_blob: Callable[[str], Awaitable[bytes]]  # the sealed blob alone
    raw_rotation_marks: Callable[[str], Awaitable[bytes]]  # every rotation mark of a user_key
    # A second store over the same records, sealing and opening with another key ring.
    with_ring: Callable[[Sealer], Awaitable[TokenStore]]
    raw_index: Callable[[str], Awaitable[set[str]]]  # user keys indexed under a quota user id
    # (quota user id, user key, age in seconds): an entry as a failed or outdated write leaves
    plant_index: Callable[[str, str, float], Awaitable[None]]
    opened: list[TokenStore] = field(default_factory=list)


async def memory_backend(sealer: Sealer) -> Backend:
    store = MemoryTokenStore(sealer)
    built: Backend

    async def copy_sealed(source: str, target: str) -> None:
        entry = store.sealed_entry(source)
        assert entry is not None
        store.plant_sealed_entry(target, entry)

    async def raw_bytes(user_key: str) -> bytes:
        entry = store.sealed_entry(user_key)
        assert entry is not None
        return str(entry.version).encode() + entry.blob

    async def raw_blob(user_key: str) -> bytes:
        entry = store.sealed_entry(user_key)
        assert entry is not None
        return entry.blob

    async def raw_rotation_marks(user_key: str) -> bytes:
        return " ".join(store.rotation_marks(user_key)).encode()

    async def with_ring(other: Sealer) -> TokenStore:
        # Memory is not shared between stores: the entries of the latest store move to the new
        # one, and the test goes on with the new one.
        latest = built.opened[-1] if built.opened else store
        assert isinstance(latest, MemoryTokenStore)
        moved = MemoryTokenStore(other)
        async for user_key in latest.scan_user_keys():
            entry = latest.sealed_entry(user_key)
            assert entry is not None
            moved.plant_sealed_entry(user_key, entry)
        built.opened.append(moved)
        return moved

    async def raw_index(quota_user_id: str) -> set[str]:
        return set(store.index_entries(quota_user_id))

    async def plant_index(quota_user_id: str, user_key: str, age_s: float) -> None:
        store.plant_index_entry(quota_user_id, user_key, age_s)

    built = Backend(
        store,
        copy_sealed,
        raw_bytes,
        raw_blob,
        raw_rotation_marks,
        with_ring,
        raw_index,
        plant_index,
    )
    return built


async def redis_backend(
    sealer: Sealer, redis_url: str, prefix: str, client: RedisClient
) -> Backend:
    store = create_store(redis_url, sealer, prefix=prefix)
    assert isinstance(store, RedisTokenStore)
    built: Backend

    async def copy_sealed(source: str, target: str) -> None:
        fields = await client.hgetall(store.tokens_key(source))
        assert fields
        await client.hset(
            store.tokens_key(target), items=[x for pair in fields.items() for x in pair]
        )

    async def raw_bytes(user_key: str) -> bytes:
        fields = await client.hgetall(store.tokens_key(user_key))
        assert set(fields) == {b"v", b"b"}
        return b"".join(v if isinstance(v, bytes) else v.encode() for v in fields.values())

    async def raw_blob(user_key: str) -> bytes:
        blob = await client.hget(store.tokens_key(user_key), "b")
        assert isinstance(blob, bytes)
        return blob

    async def raw_rotation_marks(user_key: str) -> bytes:
        pattern = f"{prefix}:{{{user_key}}}:rotated:*"
        if isinstance(client, aioredis.RedisCluster):
            scan = client.scan_iter(match=pattern, target_nodes=aioredis.RedisCluster.PRIMARIES)
        else:
            scan = client.scan_iter(match=pattern)
        keys = [key async for key in scan]
        values = [await client.get(key) for key in keys]
        return b" ".join([*keys, *(value or b"" for value in values)])

    async def with_ring(other: Sealer) -> TokenStore:
        reopened = create_store(redis_url, other, prefix=prefix)
        built.opened.append(reopened)
        return reopened

    async def raw_index(quota_user_id: str) -> set[str]:
        fields = await client.hgetall(store.quota_user_key(quota_user_id))
        return {key.decode() for key in fields}

    async def plant_index(quota_user_id: str, user_key: str, age_s: float) -> None:
        await client.hset(store.quota_user_key(quota_user_id), user_key, repr(time.time() - age_s))

    built = Backend(
        store,
        copy_sealed,
        raw_bytes,
        raw_blob,
        raw_rotation_marks,
        with_ring,
        raw_index,
        plant_index,
    )
    return built


@dataclass
class RedisFixtures:
    url: str
    prefix: str
    client: RedisClient


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def backend_kind(request: pytest.FixtureRequest) -> RedisFixtures | None:
    """``None`` for memory; the Redis fixtures for Redis (asked for only when needed).

    A plain function: async fixtures cannot be requested lazily from inside an async fixture.
    """
    if request.param == "memory":
        return None
    if request.param == "redis-cluster":
        return RedisFixtures(
            request.getfixturevalue("redis_cluster_url"),
            request.getfixturevalue("redis_cluster_prefix"),
            request.getfixturevalue("redis_cluster_client"),
        )
    return RedisFixtures(
        request.getfixturevalue("redis_url"),
        request.getfixturevalue("redis_prefix"),
        request.getfixturevalue("redis_client"),
    )


@pytest.fixture
async def backend(
    backend_kind: RedisFixtures | None, make_sealer: MakeSealer
) -> AsyncIterator[Backend]:
    if backend_kind is None:
        built = await memory_backend(make_sealer())
    else:
        built = await redis_backend(
            make_sealer(), backend_kind.url, backend_kind.prefix, backend_kind.client
        )
    try:
        yield built
    finally:
        for store in [built.store, *built.opened]:
            await store.close()


# --- the contract -------------------------------------------------------------------------------


async def test_get_returns_none_for_a_user_with_no_record(backend: Backend) -> None:
    assert await backend.store.get(new_user_key()) is None


async def test_put_then_get_returns_every_field_with_a_non_zero_version(backend: Backend) -> None:
    user, record = new_user_key(), make_record()
    written = await backend.store.put(user, record)
    assert written.version != 0
    assert written == record.with_version(written.version)
    assert await backend.store.get(user) == written


async def test_every_write_gives_the_record_a_new_version(backend: Backend) -> None:
    store, user = backend.store, new_user_key()
    first = await store.put(user, make_record())
    second = await store.put(user, make_record())
    third = await store.compare_and_set(user, second.version, make_record())
    assert third is not None
    assert len({first.version, second.version, third.version}) == 3


async def test_compare_and_set_with_the_current_version_writes_the_new_record(
    backend: Backend,
) -> None:
    store, user = backend.store, new_user_key()
    old = await store.put(user, make_record())
    replacement = make_record(expires_at=2_000_000_000.0)
    written = await store.compare_and_set(user, old.version, replacement)
    assert written is not None
    assert written == replacement.with_version(written.version)
    assert written.version != old.version
    assert await store.get(user) == written


async def test_compare_and_set_with_a_stale_version_writes_nothing(backend: Backend) -> None:
    store, user = backend.store, new_user_key()
    old = await store.put(user, make_record())
    current = await store.put(user, make_record())
    assert await store.compare_and_set(user, old.version, make_record()) is None
    assert await store.compare_and_set(user, 0, make_record()) is None
    assert await store.get(user) == current


async def test_compare_and_set_after_a_delete_does_not_bring_the_record_back(
    backend: Backend,
) -> None:
    store, user = backend.store, new_user_key()
    old = await store.put(user, make_record())
    assert await store.delete(user) is True
    assert await store.compare_and_set(user, old.version, make_record()) is None
    assert await store.get(user) is None


async def test_put_after_a_delete_gets_a_version_never_seen_before(backend: Backend) -> None:
    store, user = backend.store, new_user_key()
    seen = {(await store.put(user, make_record())).version for _ in range(5)}
    assert await store.delete(user) is True
    again = await store.put(user, make_record())
    assert again.version not in seen
    assert again.version != 0


async def test_compare_and_delete_with_the_current_version_deletes(backend: Backend) -> None:
    store, user = backend.store, new_user_key()
    current = await store.put(user, make_record())
    assert await store.compare_and_delete(user, current.version) is True
    assert await store.get(user) is None
    assert await store.compare_and_delete(user, current.version) is False


async def test_compare_and_delete_with_a_stale_version_keeps_the_record(backend: Backend) -> None:
    store, user = backend.store, new_user_key()
    old = await store.put(user, make_record())
    current = await store.put(user, make_record())
    assert await store.compare_and_delete(user, old.version) is False
    assert await store.get(user) == current


async def test_delete_says_whether_there_was_a_record(backend: Backend) -> None:
    store, user = backend.store, new_user_key()
    await store.put(user, make_record())
    assert await store.delete(user) is True
    assert await store.delete(user) is False
    assert await store.delete(new_user_key()) is False


async def test_records_of_different_users_are_independent(backend: Backend) -> None:
    store, alice, bob = backend.store, new_user_key(), new_user_key()
    alices = await store.put(alice, make_record())
    bobs = await store.put(bob, make_record())
    assert await store.delete(alice) is True
    assert await store.get(bob) == bobs
    assert await store.compare_and_set(bob, alices.version, make_record()) is None


async def test_a_record_copied_to_another_user_does_not_open(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    store, victim, attacker = backend.store, new_user_key(), new_user_key()
    record = make_record()
    await store.put(victim, record)
    await backend.copy_sealed(victim, attacker)

    with caplog.at_level(logging.WARNING):
        assert await store.get(attacker) is None

    warnings = [entry for entry in caplog.records if entry.levelno == logging.WARNING]
    assert warnings, "an unopenable record is logged"
    for entry in warnings:
        assert record.access_token not in entry.getMessage()
        assert record.refresh_token not in entry.getMessage()
    assert (await store.get(victim)) is not None


async def test_the_stored_value_contains_no_token_text(backend: Backend) -> None:
    user, record = new_user_key(), make_record()
    await backend.store.put(user, record)
    raw = await backend.raw_bytes(user)
    for text in (record.access_token, record.refresh_token, record.scope):
        assert text.encode() not in raw


async def test_only_one_of_twenty_concurrent_compare_and_sets_wins(backend: Backend) -> None:
    store, user = backend.store, new_user_key()
    base = await store.put(user, make_record())
    candidates = [make_record(access_token=f"at-candidate-{n}") for n in range(20)]

    results = await asyncio.gather(
        *(store.compare_and_set(user, base.version, record) for record in candidates)
    )

    winners = [result for result in results if result is not None]
    assert len(winners) == 1
    assert await store.get(user) == winners[0]


async def test_ping_answers_when_the_store_is_up(backend: Backend) -> None:
    await backend.store.ping()


# --- rotation marks: the grace record of a spent refresh token -----------------------------------


async def test_was_rotated_is_true_for_a_refresh_token_remembered_as_rotated(
    backend: Backend,
) -> None:
    store, user = backend.store, new_user_key()
    await store.remember_rotation(user, "rt-spent", ttl_s=60)
    assert await store.was_rotated(user, "rt-spent") is True


async def test_was_rotated_is_false_for_another_token_or_another_user(backend: Backend) -> None:
    store, user, other = backend.store, new_user_key(), new_user_key()
    assert await store.was_rotated(user, "rt-never-seen") is False
    await store.remember_rotation(user, "rt-spent", ttl_s=60)
    assert await store.was_rotated(user, "rt-spent-not") is False
    assert await store.was_rotated(other, "rt-spent") is False


async def test_a_rotation_mark_lapses_after_its_ttl(backend: Backend) -> None:
    store, user = backend.store, new_user_key()
    started = time.monotonic()
    await store.remember_rotation(user, "rt-spent", ttl_s=GRACE_TTL_S)
    assert await store.was_rotated(user, "rt-spent") is True
    while await store.was_rotated(user, "rt-spent"):
        assert time.monotonic() - started < GRACE_WAIT_S, f"still there {GRACE_WAIT_S} s later"
        await asyncio.sleep(0.05)
    assert time.monotonic() - started >= GRACE_TTL_S, "not before its ttl"


async def test_a_rotation_mark_holds_no_token_text(backend: Backend) -> None:
    store, user = backend.store, new_user_key()
    token = "rt-" + secrets.token_urlsafe(24)
    await store.remember_rotation(user, token, ttl_s=60)
    raw = await backend.raw_rotation_marks(user)
    assert raw, "the mark is stored"
    assert token.encode() not in raw
    assert token[3:].encode() not in raw


async def test_a_rotation_mark_leaves_the_record_alone(backend: Backend) -> None:
    store, user = backend.store, new_user_key()
    written = await store.put(user, make_record())
    await store.remember_rotation(user, written.refresh_token, ttl_s=60)
    assert await store.get(user) == written
    assert [key async for key in store.scan_user_keys()] == [user]


# --- the Quota-user index, for Quota's user.disconnected webhook ---------------------------------

OLD_S = INDEX_PRUNE_AFTER_S + 60  # an index entry this old belongs to no write in flight


async def test_a_record_is_found_by_the_quota_user_id_it_carries(backend: Backend) -> None:
    store, user = backend.store, new_user_key()
    await store.put(user, make_record(quota_user_id="usr_a"))
    assert await store.user_keys_for_quota_user("usr_a") == [user]
    assert await store.user_keys_for_quota_user("usr_b") == []


async def test_every_user_key_of_one_quota_user_is_found_and_no_other(backend: Backend) -> None:
    store = backend.store
    first, second, other, unknown = (new_user_key() for _ in range(4))
    await store.put(first, make_record(quota_user_id="usr_shared"))
    await store.put(second, make_record(quota_user_id="usr_shared"))
    await store.put(other, make_record(quota_user_id="usr_other"))
    await store.put(unknown, make_record())  # Quota did not say who: never indexed
    assert await store.user_keys_for_quota_user("usr_shared") == sorted([first, second])
    assert await store.user_keys_for_quota_user("usr_other") == [other]


async def test_a_refresh_keeps_the_user_in_the_index(backend: Backend) -> None:
    store, user = backend.store, new_user_key()
    written = await store.put(user, make_record(quota_user_id="usr_a"))
    again = await store.compare_and_set(user, written.version, make_record(quota_user_id="usr_a"))
    assert again is not None
    assert await store.user_keys_for_quota_user("usr_a") == [user]


@pytest.mark.parametrize("how", ["delete", "compare_and_delete"])
async def test_a_deleted_record_is_no_longer_found_by_its_quota_user_id(
    backend: Backend, how: str
) -> None:
    store, user, kept = backend.store, new_user_key(), new_user_key()
    written = await store.put(user, make_record(quota_user_id="usr_a"))
    await store.put(kept, make_record(quota_user_id="usr_a"))
    if how == "delete":
        assert await store.delete(user) is True
    else:
        assert await store.compare_and_delete(user, written.version) is True
    assert await store.user_keys_for_quota_user("usr_a") == [kept]


async def test_a_reconnect_with_another_quota_account_moves_the_user_in_the_index(
    backend: Backend,
) -> None:
    store, user = backend.store, new_user_key()
    await store.put(user, make_record(quota_user_id="usr_old"))
    await store.put(user, make_record(quota_user_id="usr_new"))
    assert await store.user_keys_for_quota_user("usr_old") == []
    assert await store.user_keys_for_quota_user("usr_new") == [user]


async def test_an_old_stale_index_entry_is_skipped_and_pruned(backend: Backend) -> None:
    store, moved, gone = backend.store, new_user_key(), new_user_key()
    await store.put(moved, make_record(quota_user_id="usr_b"))
    await backend.plant_index("usr_a", moved, OLD_S)  # its record now carries another id
    await backend.plant_index("usr_a", gone, OLD_S)  # no record at all
    assert await store.user_keys_for_quota_user("usr_a") == []
    assert await backend.raw_index("usr_a") == set()
    assert await store.user_keys_for_quota_user("usr_b") == [moved]


async def test_a_young_stale_index_entry_is_skipped_but_kept_for_a_write_in_flight(
    backend: Backend,
) -> None:
    store, user = backend.store, new_user_key()
    await backend.plant_index("usr_a", user, 0.0)  # indexed; the record is being written
    assert await store.user_keys_for_quota_user("usr_a") == []
    assert await backend.raw_index("usr_a") == {user}
    await store.put(user, make_record(quota_user_id="usr_a"))  # the write lands
    assert await store.user_keys_for_quota_user("usr_a") == [user]


async def test_an_index_entry_whose_record_does_not_open_is_skipped(backend: Backend) -> None:
    store, victim, attacker = backend.store, new_user_key(), new_user_key()
    await store.put(victim, make_record(quota_user_id="usr_a"))
    await backend.copy_sealed(victim, attacker)
    await backend.plant_index("usr_a", attacker, OLD_S)
    assert await store.user_keys_for_quota_user("usr_a") == [victim]


# --- webhook event ids, claimed once ------------------------------------------------------------


async def test_an_event_id_is_claimed_once(backend: Backend) -> None:
    store = backend.store
    assert await store.claim_event("evt_one", ttl_s=60) is True
    assert await store.claim_event("evt_one", ttl_s=60) is False
    assert await store.claim_event("evt_two", ttl_s=60) is True


async def test_a_released_event_id_can_be_claimed_again(backend: Backend) -> None:
    store = backend.store
    assert await store.claim_event("evt_one", ttl_s=60) is True
    await store.release_event("evt_one")
    assert await store.claim_event("evt_one", ttl_s=60) is True


async def test_an_event_claim_lapses_after_its_ttl(backend: Backend) -> None:
    store = backend.store
    started = time.monotonic()
    assert await store.claim_event("evt_one", ttl_s=GRACE_TTL_S) is True
    while not await store.claim_event("evt_one", ttl_s=GRACE_TTL_S):
        assert time.monotonic() - started < GRACE_WAIT_S, f"still claimed {GRACE_WAIT_S} s later"
        await asyncio.sleep(0.05)
    assert time.monotonic() - started >= GRACE_TTL_S, "not before its ttl"


# --- connects started by the backend, kept server-side ------------------------------------------


async def test_a_pending_connect_is_taken_once(backend: Backend) -> None:
    store = backend.store
    await store.remember_connect("state-one", b'{"user_key": "k"}', ttl_s=60)
    assert await store.take_connect("state-two") is None
    assert await store.take_connect("state-one") == b'{"user_key": "k"}'
    assert await store.take_connect("state-one") is None


async def test_a_pending_connect_lapses_after_its_ttl(backend: Backend) -> None:
    store = backend.store
    started = time.monotonic()
    await store.remember_connect("state-one", b"payload", ttl_s=GRACE_TTL_S)
    await asyncio.sleep(GRACE_TTL_S + 0.05)  # both backends check expiry on every read
    assert time.monotonic() - started > GRACE_TTL_S
    assert await store.take_connect("state-one") is None


# --- listing and re-sealing, for key rotation ---------------------------------------------------


async def test_scan_user_keys_lists_every_user_with_a_record_and_no_one_else(
    backend: Backend,
) -> None:
    store = backend.store
    users = {new_user_key() for _ in range(5)}
    for user in users:
        await store.put(user, make_record())
    gone = new_user_key()
    await store.put(gone, make_record())
    await store.delete(gone)
    await store.remember_rotation(new_user_key(), "rt-spent", ttl_s=60)  # marks are not records

    assert {key async for key in store.scan_user_keys()} == users


async def test_seal_state_tells_primary_older_unreadable_and_absent_apart(
    backend: Backend, make_sealer: MakeSealer
) -> None:
    old_key, new_key = secrets.token_bytes(32), secrets.token_bytes(32)
    under_old, under_new = new_user_key(), new_user_key()
    await (await backend.with_ring(make_sealer([old_key]))).put(under_old, make_record())
    store = await backend.with_ring(make_sealer([new_key, old_key]))
    await store.put(under_new, make_record())

    assert await store.seal_state(under_old) is SealState.OLDER_KEY
    assert await store.seal_state(under_new) is SealState.PRIMARY
    assert await store.seal_state(new_user_key()) is SealState.ABSENT
    new_key_only = await backend.with_ring(make_sealer([new_key]))
    assert await new_key_only.seal_state(under_old) is SealState.UNREADABLE


async def test_reseal_moves_a_record_to_the_primary_key_and_keeps_its_version(
    backend: Backend, make_sealer: MakeSealer
) -> None:
    old_key, new_key = secrets.token_bytes(32), secrets.token_bytes(32)
    old_sealer, ring = make_sealer([old_key]), make_sealer([new_key, old_key])
    user = new_user_key()
    old_store = await backend.with_ring(old_sealer)
    written = await old_store.put(user, make_record())
    store = await backend.with_ring(ring)
    assert await store.get(user) == written, "the ring [new, old] opens the old key's records"

    assert await store.reseal(user) is True

    assert ring.key_id_of(await raw_blob_of(backend, store, user)) == ring.primary_key_id
    reopened = await backend.with_ring(make_sealer([new_key]))
    assert await reopened.get(user) == written, "same tokens, same version, new key only"
    assert await store.reseal(user) is False, "already under the primary key"


async def test_a_compare_and_set_against_the_version_read_before_a_reseal_still_wins(
    backend: Backend, make_sealer: MakeSealer
) -> None:
    old_key, new_key = secrets.token_bytes(32), secrets.token_bytes(32)
    user = new_user_key()
    await (await backend.with_ring(make_sealer([old_key]))).put(user, make_record())
    store = await backend.with_ring(make_sealer([new_key, old_key]))
    read_by_a_refresh = await store.get(user)
    assert read_by_a_refresh is not None

    assert await store.reseal(user) is True
    refreshed = make_record(access_token="at-after-refresh")
    written = await store.compare_and_set(user, read_by_a_refresh.version, refreshed)

    assert written is not None
    assert await store.get(user) == written


async def test_reseal_leaves_a_record_that_does_not_open_and_logs_it(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    store, victim, attacker = backend.store, new_user_key(), new_user_key()
    record = make_record()
    await store.put(victim, record)
    await backend.copy_sealed(victim, attacker)
    before = await backend.raw_bytes(attacker)

    with caplog.at_level(logging.WARNING):
        assert await store.reseal(attacker) is False

    assert await backend.raw_bytes(attacker) == before
    warnings = [entry.getMessage() for entry in caplog.records if entry.levelno == logging.WARNING]
    assert warnings, "an unopenable record is logged"
    assert all(record.refresh_token not in message for message in warnings)
    assert await store.seal_state(attacker) is SealState.UNREADABLE


async def test_reseal_of_a_user_with_no_record_writes_nothing(backend: Backend) -> None:
    user = new_user_key()
    assert await backend.store.reseal(user) is False
    assert await backend.store.get(user) is None


async def raw_blob_of(backend: Backend, store: TokenStore, user_key: str) -> bytes:
    """The stored blob, read where ``store`` keeps it (memory stores do not share entries)."""
    if isinstance(store, MemoryTokenStore):
        entry = store.sealed_entry(user_key)
        assert entry is not None
        return entry.blob
    return await backend.raw_blob(user_key)


# --- Redis down, and back ----------------------------------------------------------------------

OPERATIONS: dict[str, Callable[[TokenStore, str], Awaitable[object]]] = {
    "get": lambda store, user: store.get(user),
    "put": lambda store, user: store.put(user, make_record()),
    "compare_and_set": lambda store, user: store.compare_and_set(user, 1, make_record()),
    "delete": lambda store, user: store.delete(user),
    "compare_and_delete": lambda store, user: store.compare_and_delete(user, 1),
    "put_indexed": lambda store, user: store.put(user, make_record(quota_user_id="usr_a")),
    "user_keys_for_quota_user": lambda store, user: store.user_keys_for_quota_user("usr_a"),
    "claim_event": lambda store, user: store.claim_event("evt_one", 60),
    "remember_connect": lambda store, user: store.remember_connect("state", b"payload", 60),
    "take_connect": lambda store, user: store.take_connect("state"),
    "ping": lambda store, user: store.ping(),
}


def closed_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: nothing listens there


@pytest.mark.parametrize("operation", OPERATIONS.values(), ids=OPERATIONS.keys())
async def test_redis_store_raises_store_unavailable_quickly_when_redis_is_down(
    make_sealer: MakeSealer, operation: Callable[[TokenStore, str], Awaitable[object]]
) -> None:
    store = create_store(f"redis://127.0.0.1:{closed_loopback_port()}/0", make_sealer())
    try:
        async with asyncio.timeout(10):
            with pytest.raises(StoreUnavailable) as caught:
                await operation(store, new_user_key())
        assert caught.value.detail is not None
        assert "ConnectionError" in caught.value.detail
    finally:
        await store.close()


async def test_redis_store_sets_no_expiry_by_default(
    redis_url: str, redis_prefix: str, redis_client: aioredis.Redis, make_sealer: MakeSealer
) -> None:
    store = create_store(redis_url, make_sealer(), prefix=redis_prefix)
    assert isinstance(store, RedisTokenStore)
    try:
        user = new_user_key()
        await store.put(user, make_record())
        assert await redis_client.pttl(store.tokens_key(user)) == -1
    finally:
        await store.close()


async def test_redis_store_with_a_record_ttl_sets_it_on_every_write(
    redis_url: str, redis_prefix: str, redis_client: aioredis.Redis, make_sealer: MakeSealer
) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=False)
    store = RedisTokenStore(client, make_sealer(), prefix=redis_prefix, record_ttl_s=60)
    user = new_user_key()
    key = store.tokens_key(user)
    try:
        written = await store.put(user, make_record())
        assert 0 < await redis_client.pttl(key) <= 60_000
        await redis_client.persist(key)
        assert await store.compare_and_set(user, written.version, make_record()) is not None
        assert 0 < await redis_client.pttl(key) <= 60_000
    finally:
        await store.close()


async def test_redis_keeps_no_quota_user_id_or_pending_connect_in_clear(
    redis_url: str, redis_prefix: str, redis_client: aioredis.Redis, make_sealer: MakeSealer
) -> None:
    store = create_store(redis_url, make_sealer(), prefix=redis_prefix)
    assert isinstance(store, RedisTokenStore)
    try:
        await store.put(new_user_key(), make_record(quota_user_id="usr_findme"))
        await store.remember_connect("state-secret", b'{"verifier": "pkce-verifier"}', ttl_s=60)
        await store.claim_event("evt_findme", ttl_s=60)
        keys = [key async for key in redis_client.scan_iter(match=f"{redis_prefix}:*")]
        values = [await redis_client.dump(key) or b"" for key in keys]
        for text in (b"usr_findme", b"state-secret", b"pkce-verifier", b"evt_findme"):
            assert all(text not in item for item in [*keys, *values])
    finally:
        await store.close()


async def test_redis_store_with_a_record_ttl_lets_the_index_expire_with_the_records(
    redis_url: str, redis_prefix: str, redis_client: aioredis.Redis, make_sealer: MakeSealer
) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=False)
    store = RedisTokenStore(client, make_sealer(), prefix=redis_prefix, record_ttl_s=60)
    user = new_user_key()
    index = store.quota_user_key("usr_a")
    try:
        written = await store.put(user, make_record(quota_user_id="usr_a"))
        assert 0 < await redis_client.pttl(index) <= 60_000
        await redis_client.persist(index)
        record = make_record(quota_user_id="usr_a")
        assert await store.compare_and_set(user, written.version, record) is not None
        assert 0 < await redis_client.pttl(index) <= 60_000
    finally:
        await store.close()


@pytest.mark.parametrize(
    "spec", ["", "redis", "memcached://127.0.0.1:11211", "http://user:hunter2@example.com"]
)
def test_create_store_rejects_a_spec_in_no_accepted_form_without_echoing_it(
    make_sealer: MakeSealer, spec: str
) -> None:
    with pytest.raises(ValueError, match="memory") as caught:
        create_store(spec, make_sealer())
    assert "hunter2" not in str(caught.value)


async def test_redis_store_keeps_records_and_recovers_by_itself_when_redis_comes_back(
    redis_proxy: TcpProxy, redis_url: str, redis_prefix: str, make_sealer: MakeSealer
) -> None:
    store = create_store(through(redis_proxy, redis_url), make_sealer(), prefix=redis_prefix)
    user = new_user_key()
    try:
        written = await store.put(user, make_record())

        await redis_proxy.stop()
        async with asyncio.timeout(10):
            for operation in OPERATIONS.values():
                with pytest.raises(StoreUnavailable):
                    await operation(store, user)
            with pytest.raises(StoreUnavailable):
                await store.compare_and_delete(user, written.version)

        await redis_proxy.start()
        assert await store.get(user) == written, "nothing was changed while Redis was away"
        assert await store.compare_and_set(user, written.version, make_record()) is not None
    finally:
        await store.close()


async def test_redis_store_replaces_a_dropped_connection_without_an_error(
    redis_proxy: TcpProxy, redis_url: str, redis_prefix: str, make_sealer: MakeSealer
) -> None:
    store = create_store(through(redis_proxy, redis_url), make_sealer(), prefix=redis_prefix)
    user = new_user_key()
    try:
        written = await store.put(user, make_record())
        await (
            redis_proxy.stop()
        )  # the pooled connection now leads nowhere, as after a Redis restart
        await redis_proxy.start()
        assert await store.get(user) == written
    finally:
        await store.close()
