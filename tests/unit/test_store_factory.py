"""``create_store``: each accepted spec builds the right client with the sidecar's settings.

These look at the clients redis-py builds, without connecting: construction must do no network
I/O (a test below makes any connection attempt fail loudly). Behaviour against real servers is
in ``tests/integration/test_redis_topologies.py``.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import (
    BlockingConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.sentinel import SentinelConnectionPool, SentinelManagedSSLConnection

from sidecar.metrics import Metrics
from sidecar.tokens.counted import CountedStore
from sidecar.tokens.crypto import Sealer
from sidecar.tokens.factory import check_store_spec, create_store, redis_store_of
from sidecar.tokens.memory import MemoryTokenStore
from sidecar.tokens.redis_clients import (
    REDIS_CLUSTER_MAX_CONNECTIONS,
    REDIS_CONNECT_TIMEOUT_S,
    REDIS_MAX_CONNECTIONS,
    REDIS_POOL_WAIT_S,
    REDIS_RETRIES,
    REDIS_SOCKET_TIMEOUT_S,
)
from sidecar.tokens.redis_store import RedisTokenStore

Build = Callable[[str], RedisTokenStore]


@pytest.fixture
async def build() -> AsyncIterator[Build]:
    """``build(spec)``: a Redis store for ``spec``, closed after the test (never connected)."""
    stores: list[RedisTokenStore] = []

    def make(spec: str) -> RedisTokenStore:
        store = create_store(spec, Sealer([secrets.token_bytes(32)]), prefix="unit")
        assert isinstance(store, RedisTokenStore)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


def sentinel_pool(store: RedisTokenStore) -> SentinelConnectionPool:
    assert isinstance(store.client, aioredis.Redis)
    pool = store.client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    return pool


def sentinel_settings(store: RedisTokenStore) -> list[dict[str, Any]]:
    """The connection settings of each sentinel the store asks for the master."""
    manager: Any = sentinel_pool(store).sentinel_manager
    return [dict(sentinel.connection_pool.connection_kwargs) for sentinel in manager.sentinels]


def cluster(store: RedisTokenStore) -> aioredis.RedisCluster:
    assert isinstance(store.client, aioredis.RedisCluster)
    return store.client


@pytest.mark.parametrize(
    "spec",
    [
        "memory",
        "redis://:pw@127.0.0.1:6379/0",
        "rediss://cache:6380/1?ssl_cert_reqs=none",
        "unix:///run/redis.sock",
        "redis+sentinel://app:pw@s1:26379,s2/mymaster/1?sentinel_password=spw",
        "rediss+sentinel://s1/mymaster?ssl_ca_certs=/etc/ca.pem",
        "redis+cluster://n1:7000,[::1]:7001/",
        "rediss+cluster://:pw@n1?ssl_check_hostname=false",
    ],
)
def test_check_store_spec_accepts_every_form_create_store_builds(spec: str) -> None:
    check_store_spec(spec)


def test_memory_builds_the_in_process_store() -> None:
    assert isinstance(create_store("memory", Sealer([secrets.token_bytes(32)])), MemoryTokenStore)


async def test_redis_store_of_tells_a_redis_store_from_others(build: Build) -> None:
    redis_store = build("redis://127.0.0.1:6379/0")
    assert redis_store_of(redis_store) is redis_store
    assert redis_store_of(MemoryTokenStore(Sealer([secrets.token_bytes(32)]))) is None
    # A store that only calls itself "redis" is not taken for one.
    assert redis_store_of(CountedStore(redis_store, Metrics())) is None


@pytest.mark.parametrize(
    "spec",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://:pw@cache.example:6380/1?ssl_cert_reqs=none",
        "unix:///run/redis.sock",
        "redis+sentinel://s1:26379,s2:26379/mymaster",
        "rediss+sentinel://:pw@s1/mymaster/2",
        "redis+cluster://n1:7000,n2:7001",
        "rediss+cluster://:pw@n1:7000/",
    ],
)
async def test_every_form_gets_the_short_timeouts_and_bytes_responses(
    build: Build, spec: str
) -> None:
    store = build(spec)
    client = store.client
    if isinstance(client, aioredis.RedisCluster):
        settings: dict[str, Any] = client.connection_kwargs
        retries = client.retry.get_retries()
    else:
        settings = client.connection_pool.connection_kwargs
        retries = settings["retry"].get_retries()
    assert settings["socket_timeout"] == REDIS_SOCKET_TIMEOUT_S
    assert settings["socket_connect_timeout"] == REDIS_CONNECT_TIMEOUT_S
    assert settings["decode_responses"] is False
    assert retries == REDIS_RETRIES
    assert store.prefix == "unit"


@pytest.mark.parametrize(
    "spec", ["redis://127.0.0.1:6379/0", "unix:///run/redis.sock", "redis+sentinel://s1/mymaster"]
)
async def test_a_full_pool_makes_a_burst_wait_rather_than_fail(build: Build, spec: str) -> None:
    client = build(spec).client
    assert isinstance(client, aioredis.Redis)
    pool = client.connection_pool
    assert isinstance(pool, BlockingConnectionPool)
    assert (pool.max_connections, pool.timeout) == (REDIS_MAX_CONNECTIONS, REDIS_POOL_WAIT_S)


async def test_a_cluster_client_gets_a_larger_pool_per_node_as_it_cannot_wait(build: Build) -> None:
    client = cluster(build("redis+cluster://n1:7000"))
    assert client.connection_kwargs["max_connections"] == REDIS_CLUSTER_MAX_CONNECTIONS


async def test_rediss_passes_redis_py_tls_options_through(build: Build) -> None:
    store = build("rediss://:pw@cache.example:6380/1?ssl_cert_reqs=none&ssl_ca_certs=/etc/ca.pem")
    assert isinstance(store.client, aioredis.Redis)
    pool = store.client.connection_pool
    assert pool.connection_class is SSLConnection
    assert pool.connection_kwargs["ssl_cert_reqs"] == "none"
    assert pool.connection_kwargs["ssl_ca_certs"] == "/etc/ca.pem"


async def test_unix_connects_through_the_socket_path(build: Build) -> None:
    store = build("unix:///run/redis.sock?db=3")
    assert isinstance(store.client, aioredis.Redis)
    assert store.client.connection_pool.connection_class is UnixDomainSocketConnection
    assert store.client.connection_pool.connection_kwargs["path"] == "/run/redis.sock"


async def test_sentinel_asks_every_listed_sentinel_for_the_named_master(build: Build) -> None:
    store = build("redis+sentinel://app:s3cret@s1:26379,[::1],s3:26380/mymaster/4")
    pool = sentinel_pool(store)
    assert pool.service_name == "mymaster"
    assert pool.is_master
    assert pool.connection_kwargs["db"] == 4
    assert pool.connection_kwargs["username"] == "app"
    assert pool.connection_kwargs["password"] == "s3cret"
    sentinels = sentinel_settings(store)
    assert [(s["host"], s["port"]) for s in sentinels] == [
        ("s1", 26379),
        ("::1", 26379),
        ("s3", 26380),
    ]
    for settings in sentinels:
        assert (settings["username"], settings["password"]) == ("app", "s3cret")
        assert settings["socket_timeout"] == REDIS_SOCKET_TIMEOUT_S


async def test_sentinel_password_authenticates_to_the_sentinels_only(build: Build) -> None:
    store = build("redis+sentinel://:redis-pw@s1/mymaster?sentinel_password=sentinel-pw")
    assert sentinel_pool(store).connection_kwargs["password"] == "redis-pw"
    [settings] = sentinel_settings(store)
    assert settings["password"] == "sentinel-pw"


async def test_rediss_sentinel_reaches_both_sentinels_and_master_over_tls(build: Build) -> None:
    store = build("rediss+sentinel://s1/mymaster?ssl_cert_reqs=optional&ssl_check_hostname=no")
    pool = sentinel_pool(store)
    assert pool.connection_class is SentinelManagedSSLConnection
    assert pool.connection_kwargs["ssl_cert_reqs"] == "optional"
    assert pool.connection_kwargs["ssl_check_hostname"] is False
    [settings] = sentinel_settings(store)
    assert settings["ssl_cert_reqs"] == "optional"


async def test_cluster_starts_discovery_from_every_listed_node(build: Build) -> None:
    client = cluster(build("redis+cluster://app:s3cret@n1:7000,n2,[::1]:7002"))
    assert [(node.host, node.port) for node in client.startup_nodes] == [
        ("n1", 7000),
        ("n2", 6379),
        ("::1", 7002),
    ]
    assert client.connection_kwargs["username"] == "app"
    assert client.connection_kwargs["password"] == "s3cret"
    assert client.connection_kwargs["connection_class"] is not SSLConnection


async def test_rediss_cluster_uses_tls_with_the_given_options(build: Build) -> None:
    client = cluster(build("rediss+cluster://n1:7000?ssl_ca_certs=/etc/ca.pem"))
    assert client.connection_kwargs["connection_class"] is SSLConnection
    assert client.connection_kwargs["ssl_ca_certs"] == "/etc/ca.pem"


async def test_building_any_store_opens_no_connection(
    build: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("create_store must not connect")

    def refuse_sync(*args: object, **kwargs: object) -> None:
        raise AssertionError("create_store must not connect")

    monkeypatch.setattr(asyncio, "open_connection", refuse)
    monkeypatch.setattr(asyncio, "open_unix_connection", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse_sync)
    for spec in (
        "redis://127.0.0.1:1/0",
        "unix:///nowhere.sock",
        "redis+sentinel://127.0.0.1:1/mymaster",
        "redis+cluster://127.0.0.1:1,127.0.0.1:2",
        "rediss+cluster://127.0.0.1:1",
    ):
        build(spec)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("", "an unrecognised value"),
        ("memcached://:hunter2@127.0.0.1:11211", "memcached://"),
        ("redis+sentinel://:hunter2@s1:26379", "names the service"),
        ("redis+sentinel://:hunter2@s1:26379/mymaster/zero", "must be a number"),
        ("redis+sentinel://:hunter2@s1:port/mymaster", "host #1 has an invalid port"),
        ("redis+sentinel://:hunter2@s1,:26380/mymaster", "host #2 is empty"),
        ("redis+sentinel://s1/m?sentinel_username=x", "needs sentinel_password"),
        ("redis+cluster://:hunter2@n1:7000/3", "database 0 only"),
        ("redis+cluster://:hunter2@n1:99999", "host #1 has an invalid port"),
        ("redis+cluster://:hunter2@::1:7000", "IPv6 address in brackets"),
        ("redis+cluster://:hunter2@[nope]:7000", "URL is malformed"),
        ("redis+cluster://:hunter2@n1,[::1", "URL is malformed"),
        ("redis+cluster://:hunter2@[::1]:7000,[nope]:7001", "host #2 has an invalid IPv6"),
        ("redis+cluster://:hunter2@n1?ssl_cert_reqs=none", "only apply to TLS"),
        ("rediss+cluster://:hunter2@n1?db=3", "unknown option 'db'"),
        ("rediss+cluster://n1?ssl_cert_reqs=hunter2", "must be one of none, optional"),
        ("rediss+cluster://n1?ssl_check_hostname=hunter2", "must be true or false"),
        ("rediss+cluster://n1?ssl_ciphers=a&ssl_ciphers=hunter2", "given twice"),
        ("redis+sentinel://s1/m?sentinel_password=hunter2&sentinel_password=x", "given twice"),
        ("redis+cluster://:hunter2@n1#frag", "no #fragment"),
        ("redis://:hunter2@cache:99999/0", "Port out of range"),
        ("rediss://:hunter2@cache/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
    ],
)
@pytest.mark.parametrize("check", [create_store, check_store_spec], ids=["create", "check"])
def test_a_spec_in_no_accepted_form_is_refused_by_name_without_echoing_secrets(
    spec: str, problem: str, check: Callable[..., object]
) -> None:
    args = (Sealer([secrets.token_bytes(32)]),) if check is create_store else ()
    with pytest.raises(ValueError, match="redis\\+sentinel://") as caught:
        check(spec, *args)
    message = str(caught.value)
    assert problem in message
    assert "redis+cluster://" in message
    assert "'memory'" in message
    assert "hunter2" not in message
