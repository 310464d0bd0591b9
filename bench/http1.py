"""A minimal HTTP/1.1 client for measuring: prebuilt requests, exact timings, chunk frames kept.

A general client (aiohttp, httpx) costs a few hundred microseconds per call and adds its own
jitter, which would blur a proxy's added latency. This one writes prebuilt request bytes on a
kept-alive connection and parses the answer incrementally (``ResponseParser``, no I/O), noting
when the first body byte and the last one arrived, and, for chunked answers, each chunk as it was
framed on the wire: a proxy that merges or splits SSE events shows up there. The same parser
serves a blocking client (sequential measurements) and an asyncio one (bursts, many connections).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

RECV_BYTES = 65536
DEFAULT_TIMEOUT_S = 30.0


def build_request(
    method: str,
    path: str,
    *,
    port: int,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
) -> bytes:
    """The bytes of one request, ready to send again and again on a kept-alive connection."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 as this client understands it."""


@dataclass
class ResponseParser:
    """Feed bytes in; ``done`` turns true when one whole response has been read.

    Bodies framed by ``Content-Length`` or chunked transfer coding; anything else (read until
    close) is not used by the bench and is refused.
    """

    keep_frames: bool = False
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    frames: list[bytes] = field(default_factory=list)
    done: bool = False
    _buffer: bytearray = field(default_factory=bytearray)
    _state: str = "head"
    _left: int = 0

    @property
    def got_body(self) -> bool:
        return bool(self.body)

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while not self.done and self._step():
            pass

    def _step(self) -> bool:
        """Consume what the current state can; ``False`` when more bytes are needed."""
        buffer = self._buffer
        if self._state == "head":
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return False
            self._parse_head(bytes(buffer[:end]).decode("latin-1"))
            del buffer[: end + 4]
            return True
        if self._state == "length":
            taken = min(self._left, len(buffer))
            self.body += buffer[:taken]
            del buffer[:taken]
            self._left -= taken
            if self._left == 0:
                self.done = True
            return taken > 0
        if self._state == "size":
            end = buffer.find(b"\r\n")
            if end < 0:
                return False
            size_text = bytes(buffer[:end]).split(b";", 1)[0].strip()
            del buffer[: end + 2]
            try:
                self._left = int(size_text, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_text!r}") from None
            self._state = "chunk" if self._left else "trailer"
            return True
        if self._state == "chunk":
            if len(buffer) < self._left + 2:
                return False
            chunk = bytes(buffer[: self._left])
            if buffer[self._left : self._left + 2] != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")
            del buffer[: self._left + 2]
            self.body += chunk
            if self.keep_frames:
                self.frames.append(chunk)
            self._state = "size"
            return True
        if self._state == "trailer":
            end = buffer.find(b"\r\n")
            if end < 0:
                return False
            del buffer[: end + 2]
            if end == 0:
                self.done = True
            return True
        raise ProtocolError(f"unknown state {self._state}")

    def _parse_head(self, head: str) -> None:
        status_line, *header_lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(f"bad status line {status_line!r}")
        self.status = int(parts[1])
        for line in header_lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self._state = "size"
        elif "content-length" in self.headers:
            self._left = int(self.headers["content-length"])
            self._state = "length"
            self.done = self._left == 0
        elif self.status in (204, 304) or 100 <= self.status < 200:
            self.done = True
        else:
            raise ProtocolError("response without Content-Length or chunked coding")

    @property
    def leftover(self) -> bytes:
        return bytes(self._buffer)


@dataclass(frozen=True)
class Exchange:
    """One request's answer and its timings (seconds from the moment the request was sent)."""

    status: int
    headers: dict[str, str]
    body: bytes
    frames: list[bytes]
    first_byte_s: float  # first body byte (or the end, for an empty body)
    total_s: float


class Client:
    """A blocking kept-alive connection: one request at a time, for sequential measurements."""

    def __init__(self, port: int, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def exchange(self, request: bytes, *, keep_frames: bool = False) -> Exchange:
        parser = ResponseParser(keep_frames=keep_frames)
        started = time.perf_counter()
        self._sock.sendall(request)
        first: float | None = None
        while not parser.done:
            data = self._sock.recv(RECV_BYTES)
            if not data:
                raise ProtocolError("connection closed mid-response")
            parser.feed(data)
            if first is None and parser.got_body:
                first = time.perf_counter()
        ended = time.perf_counter()
        if parser.leftover:
            raise ProtocolError("bytes after the response (pipelining is not used)")
        return Exchange(
            parser.status,
            parser.headers,
            bytes(parser.body),
            parser.frames,
            (first or ended) - started,
            ended - started,
        )

    def close(self) -> None:
        self._sock.close()


class AsyncClient:
    """The same on asyncio, for bursts and for holding many connections open at once."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, port: int, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> AsyncClient:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=RECV_BYTES)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def exchange(
        self, request: bytes, *, timeout_s: float = DEFAULT_TIMEOUT_S, first_only: bool = False
    ) -> Exchange:
        """Send ``request`` and read the answer; ``first_only`` returns at its first body byte
        (the rest of a held stream is left unread)."""
        parser = ResponseParser()
        started = time.perf_counter()
        self._writer.write(request)
        first: float | None = None
        async with asyncio.timeout(timeout_s):
            while not parser.done:
                data = await self._reader.read(RECV_BYTES)
                if not data:
                    raise ProtocolError("connection closed mid-response")
                parser.feed(data)
                if first is None and parser.got_body:
                    first = time.perf_counter()
                    if first_only:
                        break
        ended = time.perf_counter()
        return Exchange(
            parser.status,
            parser.headers,
            bytes(parser.body),
            [],
            (first or ended) - started,
            ended - started,
        )

    def close(self) -> None:
        self._writer.close()
