"""Request smuggling: ambiguous framing gets a 400 and never reaches the app as two requests.

Each case is sent on a raw socket to a real sidecar process, once with aiohttp's C parser and
once with its pure-Python parser (``AIOHTTP_NO_EXTENSIONS=1``). Bare-LF line endings are refused
by the sidecar's own guard (``sidecar.protocol``) before either parser reads them.
"""

from __future__ import annotations

import asyncio
import json
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
    # Bare LF (no CR): a front proxy that ends lines only at CRLF reads these differently.
    "bare-lf-request-line": "GET /a HTTP/1.1\nHost: app\r\n\r\n" + SMUGGLED,
    "bare-lf-header": "GET /a HTTP/1.1\r\nHost: app\nX-A: b\r\n\r\n" + SMUGGLED,
    "bare-lf-blank-line": "GET /a HTTP/1.1\r\nHost: app\r\n\n" + SMUGGLED,
    "bare-lf-before-request-line": "\nGET /a HTTP/1.1\r\nHost: app\r\n\r\n" + SMUGGLED,
    "bare-lf-everywhere": "GET /a HTTP/1.1\nHost: app\nContent-Length: 0\n\n" + SMUGGLED,
    "bare-lf-chunk-size": (
        "POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
        "1\nx\r\n0\r\n\r\n" + SMUGGLED
    ),
    "bare-lf-trailer": (
        "POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
        "0\r\nX-T: 1\n\r\n" + SMUGGLED
    ),
}
BARE_LF = [case for case in CASES if case.startswith("bare-lf")]


@pytest.fixture(params=["c-parser", "python-parser"])
async def sidecar(
    request: pytest.FixtureRequest, aiohttp_server: Callable[..., Any], tmp_path: Path
) -> AsyncIterator[tuple[Replica, list[str]]]:
    """A sidecar process in front of an app that records each request as "path body"."""
    seen: list[str] = []

    async def record(req: web.Request) -> web.Response:
        body = await req.read()
        seen.append(f"{req.path} {body.decode('latin-1')}".rstrip())
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


async def send_raw(url: str, raw: str, *, byte_by_byte: bool = False) -> bytes:
    return (await exchange(url, raw, byte_by_byte=byte_by_byte))[0]


async def exchange(url: str, raw: str, *, byte_by_byte: bool = False) -> tuple[bytes, bool]:
    """Send ``raw``; what came back within a bounded wait, and whether the sidecar closed."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        data = raw.encode("latin-1")
        for piece in [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]:
            writer.write(piece)
            await writer.drain()
        chunks = []
        closed = False
        try:
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), timeout=2)
                if not chunk:
                    closed = True
                    break
                chunks.append(chunk)
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
        return b"".join(chunks), closed
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


@pytest.mark.parametrize("listener", ["public", "internal", "admin"])
async def test_a_bare_lf_is_refused_with_bad_request_framing_on_every_listener(
    sidecar: tuple[Replica, list[str]], listener: str
) -> None:
    replica, seen = sidecar
    url = {
        "public": replica.public_url,
        "internal": replica.internal_url,
        "admin": "http://" + replica.env["QUOTA_SIDECAR__LISTEN__ADMIN"],
    }[listener]
    for case in BARE_LF:
        answer, closed = await exchange(url, CASES[case])
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"400", (case, answer[:300])
        assert b"\r\nconnection: close\r\n" in head.lower(), case
        assert closed, case
        error = json.loads(body)["error"]
        assert error["code"] == "bad_request_framing", case
        assert error["request_id"]
    assert seen == []


async def test_pipelined_requests_and_heads_sent_byte_by_byte_are_still_served(
    sidecar: tuple[Replica, list[str]],
) -> None:
    """Bodies are not scanned: bare LFs inside them are data, and keep-alive framing holds."""
    replica, seen = sidecar
    pipelined = (
        "POST /one HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\na\nb\nc"
        "POST /two HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
        "3;x=y\r\nd\ne\r\n0\r\nX-Trailer: t\r\n\r\n"
        "GET /three HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
    )
    expected = ["/one a\nb\nc", "/two d\ne", "/three"]
    answer = await send_raw(replica.public_url, pipelined)
    assert answer.count(b"HTTP/1.1 200 OK") == 3, answer[:600]
    assert seen == expected
    seen.clear()
    answer = await send_raw(replica.public_url, pipelined, byte_by_byte=True)
    assert answer.count(b"HTTP/1.1 200 OK") == 3, answer[:600]
    assert seen == expected
