"""The line-ending guard against aiohttp's two real parsers, byte stream by byte stream.

Each stream is fed whole, cut in two at every position, and one byte at a time: the guard must
find the same heads, hand the parser the same requests and bodies, and refuse the same bare LFs
whatever the cuts. (The listeners' end of it is in ``test_smuggling.py``, on real sockets.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import http_parser
from aiohttp.base_protocol import BaseProtocol
from aiohttp.web_protocol import RequestPayloadError

from sidecar.protocol import FramingError, HeadGuard

PARSERS = {
    "c-parser": getattr(http_parser, "HttpRequestParserC", None),
    "python-parser": http_parser.HttpRequestParserPy,
}

# Four pipelined requests: bodies full of bare LFs and blank lines (never scanned), a chunked
# body with an extension and a trailer, a blank line between two requests (skipped, as parsers do).
PIPELINE = (
    b"GET /a HTTP/1.1\r\nHost: app\r\n\r\n"
    b"POST /b HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=value\r\nx\ny\n\n\r\nA\r\n\n\n\r\n\r\n\r\n\r\n\r\n0\r\nX-Trailer: t\r\n\r\n"
    b"POST /c HTTP/1.1\r\nHost: app\r\nContent-Length: 6\r\n\r\n\n\n\r\n\n\n"
    b"\r\nGET /d HTTP/1.1\r\nHost: app\r\n\r\n"
)
EXPECTED = [
    ("/a", b""),
    ("/b", b"x\ny\n\n" + b"\n\n\r\n\r\n\r\n\r\n"),
    ("/c", b"\n\n\r\n\n\n"),
    ("/d", b""),
]

BARE_LF = {
    "request-line": b"GET /a HTTP/1.1\nHost: app\r\n\r\n",
    "header": b"GET /a HTTP/1.1\r\nHost: app\nX-A: b\r\n\r\n",
    "blank-line": b"GET /a HTTP/1.1\r\nHost: app\r\n\n",
    "before-the-request-line": b"\nGET /a HTTP/1.1\r\nHost: app\r\n\r\n",
    "second-pipelined-head": b"GET /a HTTP/1.1\r\nHost: app\r\n\r\nGET /b HTTP/1.1\nHost: app\r\n\r\n",
    "chunk-size": b"POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n1\nx\r\n0\r\n\r\n",
    "after-chunk-data": (
        b"POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\n0\r\n\r\n"
    ),
    "trailer": (
        b"POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\n\r\n"
    ),
    "after-a-body": (
        b"POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 2\r\n\r\n\n\nGET /b HTTP/1.1\n\r\n\r\n"
    ),
}


class Events:
    def __init__(self) -> None:
        self.started = 0
        self.done = 0

    def head_started(self) -> None:
        self.started += 1

    def head_done(self) -> None:
        self.done += 1


@pytest.fixture(params=list(PARSERS))
def parser_class(request: pytest.FixtureRequest) -> Any:
    cls = PARSERS[request.param]
    if cls is None:
        pytest.skip("aiohttp's C extension is not built here")
    return cls


def make_guard(parser_class: Any, queue: int = 0) -> tuple[HeadGuard, Events]:
    loop = asyncio.get_running_loop()
    protocol = BaseProtocol(loop)
    parser = parser_class(
        protocol,
        loop,
        2**16,
        max_line_size=8190,
        max_field_size=8190,
        max_headers=128,
        payload_exception=RequestPayloadError,
        max_msg_queue_size=queue,
    )
    protocol._parser = parser
    events = Events()
    return HeadGuard(parser, events), events


def cuts(data: bytes) -> Iterator[list[bytes]]:
    yield [data]
    for at in range(1, len(data)):
        yield [data[:at], data[at:]]
    yield [data[i : i + 1] for i in range(len(data))]


def received(messages: list[Any]) -> list[tuple[str, bytes]]:
    return [(msg.path, payload.read_nowait()) for msg, payload in messages]


def feed(guard: HeadGuard, pieces: list[bytes]) -> list[Any]:
    messages: list[Any] = []
    for piece in pieces:
        got, upgraded, tail = guard.feed_data(piece)
        assert not upgraded
        assert tail == b""
        messages.extend(got)
    return messages


async def test_pipelined_requests_reach_the_parser_intact_however_the_bytes_are_cut(
    parser_class: Any,
) -> None:
    for pieces in cuts(PIPELINE):
        guard, events = make_guard(parser_class)
        assert received(feed(guard, pieces)) == EXPECTED, [len(p) for p in pieces]
        assert events.done == len(EXPECTED)
        # A head is announced (the header timer armed) only when a read leaves it incomplete:
        # never when the stream comes whole, at most once per cut, for every head byte by byte.
        most = {1: 0, 2: 1}.get(len(pieces), len(EXPECTED))
        assert events.started <= most
        if len(pieces) == len(PIPELINE):
            assert events.started == len(EXPECTED)


@pytest.mark.parametrize("case", list(BARE_LF))
async def test_a_bare_lf_in_a_head_or_in_chunked_framing_is_refused_however_the_bytes_are_cut(
    parser_class: Any, case: str
) -> None:
    for pieces in cuts(BARE_LF[case]):
        guard, _ = make_guard(parser_class)
        with pytest.raises(FramingError):
            feed(guard, pieces)
        # Once refused, nothing more is parsed on the connection.
        assert guard.feed_data(b"GET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n") == ([], False, b"")


async def test_a_malformed_chunk_size_is_refused(parser_class: Any) -> None:
    guard, _ = make_guard(parser_class)
    with pytest.raises(FramingError):
        feed(
            guard,
            [b"POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n4 ;x\r\nwxyz"],
        )


async def test_a_head_held_back_by_a_full_pipelining_queue_comes_through_in_order(
    parser_class: Any,
) -> None:
    guard, _ = make_guard(parser_class, queue=1)
    messages = feed(guard, [PIPELINE])
    for _ in range(10):
        if len(messages) == len(EXPECTED):
            break
        guard.message_consumed()
        messages += feed(guard, [b""])
    assert received(messages) == EXPECTED


async def test_bytes_after_a_websocket_upgrade_are_passed_on_unscanned(parser_class: Any) -> None:
    guard, _ = make_guard(parser_class)
    head = (
        b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    messages, upgraded, tail = guard.feed_data(head + b"\x81\x02\n\n")
    assert [msg.path for msg, _ in messages] == ["/ws"]
    assert upgraded
    assert tail == b"\x81\x02\n\n"
