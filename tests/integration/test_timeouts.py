"""Timeouts that fit streams, and clients too slow to be allowed to hold a connection.

Outgoing (the /v1 forwarder to Quota, the public proxy to the app): the answer must *start*
within ``first_byte_timeout_s`` of the request being sent, then each silence in its body may
last up to the idle timeout; a slow upload counts against neither. A stand-in server plays both
Quota and the app, with an endpoint per behaviour.

Incoming (every listener): a request head must arrive within ``limits.header_timeout_s``; a slow
body, or a kept-alive connection waiting for its next request, is not a slow head.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.config_loader import ConfigError
from tests.integration.conftest import Stack
from tests.scrape import scrape
from tests.support import make_config, make_tokens

FIRST_BYTE_S = 0.5
PAUSE_S = 1.0  # longer than the first-byte timeout, shorter than the idle one
IDLE_S = 2.5
HEADER_S = 0.5
BODY_IDLE_S = 1.5  # longer than PAUSE_S and 2 * HEADER_S: the slow uploads above it still pass
WAIT_S = 10.0  # the bound on every wait in this file
CHUNKS = [b"one\n", b"two\n", b"three\n"]


@dataclass
class Standin:
    """Quota and the host app at once: /v1/<behaviour> and /<behaviour>."""

    url: str
    left: asyncio.Event = field(default_factory=asyncio.Event)  # a caller hung up on us
    uploads: list[bytes] = field(default_factory=list)


@pytest.fixture
async def standin(aiohttp_server: Callable[..., Any]) -> Standin:
    state = Standin(url="")

    async def until_the_caller_leaves(request: web.Request) -> None:
        try:
            while request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.02)
        finally:  # the caller left, whether this handler is then cancelled or not
            state.left.set()

    async def no_answer(request: web.Request) -> web.StreamResponse:
        await until_the_caller_leaves(request)
        return web.Response()

    async def paced(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        for index, chunk in enumerate(CHUNKS):
            if index:
                await asyncio.sleep(PAUSE_S)
            await response.write(chunk)
        await response.write_eof()
        return response

    async def stalls(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(CHUNKS[0])
        await until_the_caller_leaves(request)
        return response

    async def upload(request: web.Request) -> web.Response:
        state.uploads.append(await request.read())
        return web.json_response({"received": len(state.uploads[-1])})

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path})

    app = web.Application()
    for prefix in ("/v1", ""):
        app.router.add_route("*", f"{prefix}/no-answer", no_answer)
        app.router.add_get(f"{prefix}/paced", paced)
        app.router.add_get(f"{prefix}/stalls", stalls)
        app.router.add_post(f"{prefix}/upload", upload)
    app.router.add_route("*", "/{tail:.*}", ok)
    server = await aiohttp_server(app)
    state.url = str(server.make_url("")).rstrip("/")
    return state


@pytest.fixture
def store_kind() -> str:
    return "memory"  # nothing here is about storage


@pytest.fixture
def config_overrides(standin: Standin) -> dict[str, dict[str, Any]]:
    return {
        "quota": {
            "base_url": standin.url,
            "first_byte_timeout_s": FIRST_BYTE_S,
            "stream_idle_timeout_s": IDLE_S,
        },
        "upstream": {
            "url": standin.url,
            "first_byte_timeout_s": FIRST_BYTE_S,
            "idle_timeout_s": IDLE_S,
        },
        "limits": {"header_timeout_s": HEADER_S, "body_idle_timeout_s": BODY_IDLE_S},
    }


@pytest.fixture(params=["quota", "upstream"])
async def target(request: pytest.FixtureRequest, stack: Stack) -> AsyncIterator[Target]:
    """The /v1 forwarder (to "Quota") or the public proxy (to "the app")."""
    if request.param == "quota":
        await stack.store.put(stack.user_key("alice"), make_tokens(now=stack.clock.now))
        yield Target(stack, f"{stack.internal_url}/v1", {"X-Quota-User": "alice"}, "quota")
    else:
        yield Target(stack, stack.public_url, {}, "upstream")


@dataclass
class Target:
    stack: Stack
    base: str
    headers: dict[str, str]
    name: str

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, bytes]:
        http = self.stack.backend
        async with http.request(method, self.base + path, headers=self.headers, **kw) as resp:
            return resp.status, await resp.read()


async def test_an_answer_that_does_not_start_in_time_is_a_504_and_the_call_is_cancelled(
    target: Target, standin: Standin
) -> None:
    status, body = await asyncio.wait_for(target.call("POST", "/no-answer", data=b"{}"), WAIT_S)
    assert status == 504
    assert json.loads(body)["error"]["code"] == f"{target.name}_timeout"
    await asyncio.wait_for(standin.left.wait(), WAIT_S)  # the outgoing call was cut, not left


async def test_an_answer_that_does_not_start_in_time_is_counted_as_a_timeout_of_that_call(
    target: Target,
) -> None:
    status, _ = await asyncio.wait_for(target.call("POST", "/no-answer", data=b"{}"), WAIT_S)
    assert status == 504
    status, _ = await asyncio.wait_for(target.call("POST", "/upload", data=b"{}"), WAIT_S)
    assert status == 200
    scraped = await scrape(target.stack.admin_url)
    family, call = ("quota", "v1") if target.name == "quota" else ("app", "proxy")
    assert scraped.value(f"quota_sidecar_{family}_errors_total", call=call, code="timeout") == 1
    # The duration counts the call that was answered; the other counts as an error only.
    assert scraped.value(f"quota_sidecar_{family}_request_duration_seconds_count", call=call) == 1


async def test_pauses_after_the_answer_started_may_last_longer_than_the_first_byte_timeout(
    target: Target,
) -> None:
    status, body = await asyncio.wait_for(target.call("GET", "/paced"), WAIT_S)
    assert (status, body) == (200, b"".join(CHUNKS))


async def test_a_slow_upload_does_not_count_against_the_first_byte_timeout(
    target: Target, standin: Standin
) -> None:
    async def slowly() -> AsyncIterator[bytes]:
        for index, chunk in enumerate(CHUNKS):
            if index:
                await asyncio.sleep(PAUSE_S)
            yield chunk

    status, body = await asyncio.wait_for(target.call("POST", "/upload", data=slowly()), WAIT_S)
    assert status == 200, body
    assert standin.uploads == [b"".join(CHUNKS)]


async def test_silence_in_a_body_longer_than_the_idle_timeout_still_cuts_the_stream(
    target: Target, standin: Standin
) -> None:
    http = target.stack.backend
    async with http.get(target.base + "/stalls", headers=target.headers) as resp:
        assert resp.status == 200
        assert await asyncio.wait_for(resp.content.readexactly(len(CHUNKS[0])), WAIT_S)
        # The sidecar cuts the client connection: a truncated body must not look complete.
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.content.read(), WAIT_S)
    await asyncio.wait_for(standin.left.wait(), WAIT_S)


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("quota", "first_byte_timeout_s"),
        ("upstream", "first_byte_timeout_s"),
        ("limits", "header_timeout_s"),
    ],
)
def test_a_timeout_of_zero_is_refused_by_its_key_path(section: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: must be greater than 0"):
        make_config(**{section: {key: 0}})


# Slow heads, on raw sockets.


async def open_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    received = b""
    try:
        while chunk := await reader.read(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def listener_url(stack: Stack, listener: str) -> str:
    return {"public": stack.public_url, "internal": stack.internal_url, "admin": stack.admin_url}[
        listener
    ]


@pytest.mark.parametrize("listener", ["public", "internal", "admin"])
async def test_a_head_sent_too_slowly_is_answered_408_and_the_connection_closed(
    stack: Stack, standin: Standin, listener: str
) -> None:
    reader, writer = await open_raw(listener_url(stack, listener))
    answer = asyncio.create_task(read_until_closed(reader))
    try:
        for byte in b"GET /slowloris HTTP/1.1\r\nHost: x\r\n":  # one byte every 0.1 s
            if answer.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)
        received = await asyncio.wait_for(answer, WAIT_S)
    finally:
        writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), received[:200]
    assert b"\r\nConnection: close\r\n" in head
    assert json.loads(body)["error"]["code"] == "request_header_timeout"


async def test_a_connection_that_sends_nothing_is_closed_without_an_answer(stack: Stack) -> None:
    reader, writer = await open_raw(stack.public_url)
    try:
        assert await asyncio.wait_for(read_until_closed(reader), WAIT_S) == b""
    finally:
        writer.close()


async def test_a_slow_client_does_not_hold_up_a_normal_request_on_the_same_listener(
    stack: Stack,
) -> None:
    reader, writer = await open_raw(stack.public_url)
    try:
        writer.write(b"GET /slow")  # and nothing more
        async with stack.browser.session.get(f"{stack.public_url}/normal") as resp:
            assert resp.status == 200
            assert await resp.json() == {"path": "/normal"}
        assert (await asyncio.wait_for(read_until_closed(reader), WAIT_S)).startswith(
            b"HTTP/1.1 408 "
        )
    finally:
        writer.close()


async def test_a_kept_alive_connection_may_wait_longer_than_the_header_timeout(
    stack: Stack,
) -> None:
    reader, writer = await open_raw(stack.public_url)
    try:
        writer.write(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"/first" in await asyncio.wait_for(reader.readuntil(b'"/first"}'), WAIT_S)
        await asyncio.sleep(3 * HEADER_S)  # idle between requests: the keep-alive timeout's
        writer.write(b"GET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        second = await asyncio.wait_for(read_until_closed(reader), WAIT_S)
        assert second.startswith(b"HTTP/1.1 200 ")
        assert second.endswith(b'"/second"}')
    finally:
        writer.close()


async def test_a_slow_body_is_not_cut_by_the_header_timeout(stack: Stack, standin: Standin) -> None:
    reader, writer = await open_raw(stack.public_url)
    try:
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
        )
        for byte in b"abc":  # each byte after a pause longer than the header timeout
            await asyncio.sleep(2 * HEADER_S)
            writer.write(bytes([byte]))
        answer = await asyncio.wait_for(read_until_closed(reader), WAIT_S)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert standin.uploads == [b"abc"]


@pytest.mark.parametrize("size", [10, 2 * 1024 * 1024])  # kept for a replay, or streamed on
async def test_a_body_that_stops_arriving_is_a_408_and_the_call_is_cut(
    target: Target, standin: Standin, size: int
) -> None:
    """A client that sends part of its body and then nothing cannot hold a connection to the
    app or Quota: after limits.body_idle_timeout_s the sidecar answers 408 and lets go."""
    url = target.stack.internal_url if target.name == "quota" else target.stack.public_url
    path = "/v1/upload" if target.name == "quota" else "/upload"
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in target.headers.items())
    reader, writer = await open_raw(url)
    try:
        writer.write(head.encode() + b"\r\n" + b"x" * (size // 2))  # then nothing more
        # Read the answer, not to the close: aiohttp lingers a while on an unread body.
        answer = await asyncio.wait_for(reader.readuntil(b"}}"), WAIT_S)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert b'"request_body_timeout"' in answer
    assert standin.uploads == []
