"""Request smuggling: ambiguous framing gets a 400 and never reaches the app as two requests.

Each case is sent on a raw socket to a real sidecar process, once with aiohttp's C parser and
once with its pure-Python parser (``AIOHTTP_NO_EXTENSIONS=1``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.integration.replicas import Replica

SMUGGLED = "GET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n"

CASES = {
    "content-length-and-chunked": (
        "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        "0\r\n\r\n" + SMUGGLED
    ),
    "two-different-content-lengths": (
        "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 0\r\nContent-Length: 40\r\n\r\n"
        + SMUGGLED
    ),
    "chunked-not-last": (
        "POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
        + SMUGGLED
    ),
    "obfuscated-transfer-encoding": (
        "POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: xchunked\r\nContent-Length: 4\r\n\r\n"
        "0\r\n\r\n" + SMUGGLED
    ),
    "space-before-colon": (
        "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length : 40\r\n\r\n" + SMUGGLED
    ),
    "obs-fold": "GET /a HTTP/1.1\r\nHost: app\r\nX-Folded: one\r\n two\r\n\r\n" + SMUGGLED,
    "bad-chunk-size": (
        "POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
        "4 ;x\r\nwxyz\r\n0\r\n\r\n" + SMUGGLED
    ),
    "nul-in-header": "GET /a HTTP/1.1\r\nHost: app\r\nX-A: a\x00b\r\n\r\n" + SMUGGLED,
}


@pytest.fixture(params=["c-parser", "python-parser"])
async def sidecar(
    request: pytest.FixtureRequest, aiohttp_server: Callable[..., Any], tmp_path: Path
) -> AsyncIterator[tuple[Replica, list[str]]]:
    seen: list[str] = []

    async def record(req: web.Request) -> web.Response:
        seen.append(req.path)
        await req.read()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = await aiohttp_server(app)
    env = {
        "QUOTA_CLIENT_ID": "quota_client_test",
        "QUOTA_CLIENT_SECRET": "quota_secret_test",
        "SESSION_SECRET": "s" * 40,
        "QUOTA_SIDECAR__UPSTREAM__URL": str(server.make_url("")).rstrip("/"),
        "QUOTA_SIDECAR__LOG__LEVEL": "warning",
    }
    if request.param == "python-parser":
        env["AIOHTTP_NO_EXTENSIONS"] = "1"
    replica = Replica.configure(env, tmp_path, 0)
    replica.start()
    try:
        await replica.wait_ready()
        yield replica, seen
    finally:
        replica.stop()


async def send_raw(url: str, raw: str) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw.encode("latin-1"))
        await writer.drain()
        chunks = []
        try:
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), timeout=2)
                if not chunk:
                    break
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)
    finally:
        writer.close()


@pytest.mark.parametrize("case", list(CASES))
async def test_ambiguous_requests_are_refused_and_never_split_in_two(
    sidecar: tuple[Replica, list[str]], case: str
) -> None:
    replica, seen = sidecar
    answer = await send_raw(replica.public_url, CASES[case])
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.split(b" ")[1] in (b"400", b"501"), answer[:300]
    assert answer.count(b"HTTP/1.") == 1, "a second response means a second request was read"
    await asyncio.sleep(0.1)
    assert "/smuggled" not in seen
