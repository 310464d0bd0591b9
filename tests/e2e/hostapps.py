"""Non-Python host apps under test: start one as a process, and put the sidecar in front of it.

    browser ──► sidecar public  http://localhost:<port>  ──► host app process  127.0.0.1:<app>
                 host app ──► sidecar internal  127.0.0.1:<internal> ──► Quota emulator

Ports are picked free before anything starts, because the app needs the internal listener's URL
and the sidecar needs the app's. The token store is the in-memory one (one process).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from sidecar.app import Sidecar
from sidecar.config_loader import build_config
from sidecar.mock_quota import MockQuota, start_mock_quota
from sidecar.services import open_services

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
# Slow enough that an answer visibly streams in the browser.
CHUNK_DELAY_S = 0.1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Front:
    url: str  # what the browser opens: the sidecar's public listener
    quota_url: str
    quota: MockQuota
    internal_url: str  # what the host app's backend calls


@contextlib.asynccontextmanager
async def sidecar_in_front_of(upstream_url: str, internal_port: int) -> AsyncIterator[Front]:
    """The Quota emulator and the sidecar, serving ``upstream_url`` to the browser."""
    quota = MockQuota()
    quota.settings.chunk_delay_s = CHUNK_DELAY_S
    quota_runner, quota_url = await start_mock_quota(quota, "127.0.0.1", 0)
    try:
        port = free_port()
        client = quota.register_client(
            name="Host app example",
            redirect_uris=[f"http://localhost:{port}/auth/quota/callback"],
        )
        config = build_config(
            {
                "quota": {
                    "base_url": quota_url,
                    "client_id": client.client_id,
                    "client_secret": client.client_secret,
                },
                "listen": {
                    "public": f"localhost:{port}",
                    "internal": f"127.0.0.1:{internal_port}",
                    "admin": "off",
                },
                "upstream": {"url": upstream_url},
                "session": {"secret": secrets.token_urlsafe(32)},
                "log": {"format": "text"},
            },
            env={},
        )
        async with open_services(config) as services:
            sidecar = Sidecar(services)
            await sidecar.start()
            try:
                yield Front(
                    url=f"http://localhost:{port}",
                    quota_url=quota_url,
                    quota=quota,
                    internal_url=sidecar.urls["internal"],
                )
            finally:
                await sidecar.stop()
    finally:
        await quota_runner.cleanup()


@contextlib.asynccontextmanager
async def host_app_process(
    argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], port: int, log_path: Path
) -> AsyncIterator[str]:
    """Run a host app until it answers ``GET /quota/whoami`` (401, nobody signed in)."""
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            await _wait_until_ready(url, process, log_path)
            yield url
        finally:
            _stop(process)


async def _wait_until_ready(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"the host app exited with code {process.returncode}:\n{_tail(log_path)}",
                    pytrace=False,
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url + "/quota/whoami") as resp:
                    if resp.status == 401:
                        return
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the host app did not answer within {READY_TIMEOUT_S} s:\n{_tail(log_path)}",
                    pytrace=False,
                )
            await asyncio.sleep(0.1)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)


def _tail(path: Path, limit: int = 4000) -> str:
    return path.read_text(errors="replace")[-limit:]
