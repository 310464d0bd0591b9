"""The reverse proxy streams with backpressure: big bodies in bounded memory, long gaps, hang-ups.

The sidecar runs as its own process so its peak memory (VmHWM) can be read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.integration.replicas import Replica

MB = 1024 * 1024
CHUNK = 64 * 1024


@dataclass
class Upstream:
    app: web.Application
    received: list[int] = field(default_factory=list)
    stream_ended_at: list[float] = field(default_factory=list)


def create_upstream() -> Upstream:
    app = web.Application(client_max_size=0)
    up = Upstream(app)

    async def upload(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        up.received.append(size)
        return web.json_response({"received": size})

    async def download(request: web.Request) -> web.StreamResponse:
        total = int(request.query["mb"]) * MB
        resp = web.StreamResponse()
        if request.query.get("length"):
            resp.content_length = total
        await resp.prepare(request)
        block = b"x" * CHUNK
        for _ in range(total // CHUNK):
            await resp.write(block)
        await resp.write_eof()
        return resp

    async def sse(request: web.Request) -> web.StreamResponse:
        gap = float(request.query.get("gap", "0.2"))
        count = int(request.query.get("count", "1000000"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(count):
                if i:
                    await asyncio.sleep(gap)
                await resp.write(f"data: {i}\n\n".encode())
            await resp.write_eof()
        finally:
            up.stream_ended_at.append(time.monotonic())
        return resp

    async def whoami(request: web.Request) -> web.Response:
        return web.Response(status=401)

    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    app.router.add_get("/sse", sse)
    app.router.add_get("/quota/whoami", whoami)
    return up


@dataclass
class Proxy:
    replica: Replica
    upstream: Upstream

    @property
    def url(self) -> str:
        return self.replica.public_url

    def peak_rss_mb(self) -> float:
        return _status_kb(self.replica.pid, "VmHWM") / 1024

    def rss_mb(self) -> float:
        return _status_kb(self.replica.pid, "VmRSS") / 1024


def _status_kb(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise AssertionError(f"{field_name} not in /proc/{pid}/status")


@pytest.fixture
async def proxy(aiohttp_server: Callable[..., Any], tmp_path: Path) -> AsyncIterator[Proxy]:
    upstream = create_upstream()
    server = await aiohttp_server(upstream.app)
    env = {
        "QUOTA_CLIENT_ID": "quota_client_test",
        "QUOTA_CLIENT_SECRET": "quota_secret_test",
        "SESSION_SECRET": "s" * 40,
        "QUOTA_SIDECAR__UPSTREAM__URL": str(server.make_url("")).rstrip("/"),
        "QUOTA_SIDECAR__LOG__LEVEL": "warning",
    }
    replica = Replica.configure(env, tmp_path, 0)
    replica.start()
    try:
        await replica.wait_ready()
        yield Proxy(replica, upstream)
    finally:
        replica.stop()


async def _body(total: int) -> AsyncIterator[bytes]:
    block = b"y" * CHUNK
    for _ in range(total // CHUNK):
        yield block


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_a_100_mb_upload_streams_through_in_bounded_memory(
    proxy: Proxy, framing: str
) -> None:
    baseline = proxy.rss_mb()
    total = 100 * MB
    headers = {"Content-Length": str(total)} if framing == "content-length" else {}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{proxy.url}/upload", data=_body(total), headers=headers) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["received"] == total
    assert proxy.upstream.received == [total]
    assert proxy.peak_rss_mb() - baseline < 50


@pytest.mark.parametrize("length", ["", "1"])
async def test_a_100_mb_download_streams_through_in_bounded_memory(
    proxy: Proxy, length: str
) -> None:
    baseline = proxy.rss_mb()
    received = 0
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{proxy.url}/download", params={"mb": "100", "length": length}) as resp,
    ):
        assert resp.status == 200
        async for chunk in resp.content.iter_any():
            received += len(chunk)
            await asyncio.sleep(0)  # a client that reads at its own pace
    assert received == 100 * MB
    assert proxy.peak_rss_mb() - baseline < 50


async def test_an_sse_stream_with_30_s_gaps_is_not_cut(proxy: Proxy) -> None:
    events = []
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{proxy.url}/sse",
            params={"gap": "30", "count": "2"},
            timeout=aiohttp.ClientTimeout(total=90),
        ) as resp,
    ):
        async for line in resp.content:
            if line.startswith(b"data:"):
                events.append(line.strip())
    assert events == [b"data: 0", b"data: 1"]


async def test_a_client_leaving_mid_stream_closes_the_upstream_within_a_second(
    proxy: Proxy,
) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.get(f"{proxy.url}/sse", params={"gap": "0.2"})
        await resp.content.readline()
        left_at = time.monotonic()
        resp.close()  # drop the connection
    deadline = left_at + 5
    while not proxy.upstream.stream_ended_at and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert proxy.upstream.stream_ended_at, "the upstream stream was never closed"
    assert proxy.upstream.stream_ended_at[0] - left_at < 1.0
