"""SIGTERM on a real ``python -m sidecar run``: not ready at once, drain, let streams end, exit 0.

The emulator and a stub host app run in the test's loop; the sidecar is a child process on free
loopback ports with the in-memory store. A user connects through the browser flow, then opens
an SSE stream that lasts about two seconds (the emulator paces its chunks).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.mock_quota import MockQuota, create_app
from tests.integration.conftest import free_port
from tests.support import (
    Browser,
    approve_consent,
    create_stub_upstream,
    sse_events,
)

DRAIN_S = 0.5
GRACE_S = 10.0
CHUNK_DELAY_S = 0.2  # about a dozen chunks: a stream of ~2.5 s
START_TIMEOUT_S = 30.0


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    quota: MockQuota
    public_url: str
    internal_url: str
    admin_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


async def status_of(url: str) -> int | None:
    """The status of a GET on a new connection, or ``None`` when the connection is refused."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        try:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                return resp.status
        except aiohttp.ClientConnectionError:
            return None


async def wait_until(
    check: Callable[[], Any], *, within_s: float, what: str, poll_s: float = 0.02
) -> float:
    """Poll ``check`` (async) until it returns true; the monotonic time it did."""
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, f"not within {within_s} s: {what}"
        await asyncio.sleep(poll_s)
    return time.monotonic()


@pytest.fixture
async def connected(aiohttp_server: Callable[..., Any], tmp_path: Path) -> AsyncIterator[Running]:
    quota = MockQuota()
    quota.settings.chunk_delay_s = CHUNK_DELAY_S
    quota_url = str((await aiohttp_server(create_app(quota))).make_url("")).rstrip("/")
    upstream = create_stub_upstream()
    upstream_url = str((await aiohttp_server(upstream.app)).make_url("")).rstrip("/")
    public, internal, admin = free_port(), free_port(), free_port()
    client = quota.register_client(
        name="Shutdown test", redirect_uris=[f"http://127.0.0.1:{public}/auth/quota/callback"]
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "QUOTA_CLIENT_ID": client.client_id,
        "QUOTA_CLIENT_SECRET": client.client_secret,
        "QUOTA_BASE_URL": quota_url,
        "SESSION_SECRET": "shutdown-test-session-secret-of-32-chars",
        "QUOTA_SIDECAR__LISTEN__PUBLIC": f"127.0.0.1:{public}",
        "QUOTA_SIDECAR__LISTEN__INTERNAL": f"127.0.0.1:{internal}",
        "QUOTA_SIDECAR__LISTEN__ADMIN": f"127.0.0.1:{admin}",
        "QUOTA_SIDECAR__UPSTREAM__URL": upstream_url,
        "QUOTA_SIDECAR__SHUTDOWN__DRAIN_DELAY_S": str(DRAIN_S),
        "QUOTA_SIDECAR__SHUTDOWN__GRACE_S": str(GRACE_S),
    }
    log_path = tmp_path / "sidecar.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run"],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = Running(
        proc,
        quota,
        f"http://127.0.0.1:{public}",
        f"http://127.0.0.1:{internal}",
        f"http://127.0.0.1:{admin}",
        log_path,
    )
    browser = Browser()
    try:

        async def ready() -> bool:
            assert proc.poll() is None, running.log()
            return await status_of(f"{running.admin_url}/readyz") == 200

        await wait_until(ready, within_s=START_TIMEOUT_S, what="the sidecar started")
        browser.sign_in(running.public_url, "alice")
        consent = await browser.get(f"{running.public_url}/auth/quota/connect")
        assert consent.status == 200, await consent.text()
        landed = await approve_consent(browser, consent, "alice@example.com")
        assert landed.status == 200
        yield running
    finally:
        await browser.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


async def open_stream(
    http: aiohttp.ClientSession, running: Running
) -> tuple[aiohttp.ClientResponse, AsyncIterator[str]]:
    resp = await http.post(
        f"{running.internal_url}/v1/chat/completions",
        json={
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "tell me something long enough"}],
            "stream": True,
        },
        headers={"X-Quota-User": "alice"},
    )
    assert resp.status == 200
    events = sse_events(resp)
    assert (await anext(events)).startswith("data: ")
    return resp, events


async def test_sigterm_lets_an_open_stream_finish_refuses_new_connections_and_exits_0(
    connected: Running,
) -> None:
    async with aiohttp.ClientSession() as http:
        _, events = await open_stream(http, connected)
        signalled = time.monotonic()
        connected.proc.send_signal(signal.SIGTERM)

        async def not_ready() -> bool:
            return await status_of(f"{connected.admin_url}/readyz") == 503

        await wait_until(not_ready, within_s=DRAIN_S, what="readiness false after SIGTERM")
        assert await status_of(f"{connected.admin_url}/healthz") == 200

        async def refused() -> bool:
            return (
                await status_of(f"{connected.internal_url}/v1/models") is None
                and await status_of(f"{connected.public_url}/") is None
            )

        closed = await wait_until(refused, within_s=DRAIN_S + 3, what="listeners closed")
        assert closed - signalled >= DRAIN_S * 0.9

        rest = [event async for event in events]
        assert rest[-1] == "data: [DONE]"
        assert time.monotonic() - signalled < GRACE_S
    assert connected.proc.wait(timeout=GRACE_S + 10) == 0, connected.log()
    assert connected.quota.counters["chat.stream_aborted"] == 0
    assert "shutting down" in connected.log_path.read_text()


async def test_a_second_sigterm_exits_at_once_with_143(connected: Running) -> None:
    connected.quota.settings.chunk_delay_s = 5.0  # a stream that would outlast any patience
    async with aiohttp.ClientSession() as http:
        resp, _ = await open_stream(http, connected)
        connected.proc.send_signal(signal.SIGTERM)

        async def not_ready() -> bool:
            return await status_of(f"{connected.admin_url}/readyz") == 503

        await wait_until(not_ready, within_s=DRAIN_S, what="readiness false after SIGTERM")
        connected.proc.send_signal(signal.SIGTERM)
        assert connected.proc.wait(timeout=3) == 128 + signal.SIGTERM, connected.log()
        resp.close()
