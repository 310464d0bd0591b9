"""Guard each listener's connections below aiohttp: strict line endings and a bound on slow heads.

aiohttp parses requests itself (its C parser, or the pure-Python one under
``AIOHTTP_NO_EXTENSIONS``). Every listener's protocol here is aiohttp's own ``RequestHandler``
with its parser wrapped by a ``HeadGuard``, which sees the bytes before the parser does:

* **Line endings.** Each line of a request head (request line, headers, the blank line, and
  chunk-size and trailer lines of a chunked body) must end in CRLF. A bare LF is answered
  ``400 bad_request_framing`` and the connection is closed: a front proxy that ends lines only
  at CRLF would read such a request differently from us (request smuggling). aiohttp's parsers
  refuse most bare LFs themselves, but not all (the C parser skips a bare LF before the request
  line), and the guard holds whatever parser and version is installed.
* **Slow heads.** A head must be complete ``limits.header_timeout_s`` after the connection
  opened, or after its first byte on a kept-alive connection (the wait for that first byte is
  ``limits.keepalive_timeout_s``, aiohttp's own). Otherwise the connection is closed, with
  ``408 request_header_timeout`` if part of a head had come.

Only heads are scanned. The guard learns each message's framing from the parser itself — it feeds
the parser up to the blank line that ends a head, then reads the parsed ``Content-Length`` or
``chunked`` — and skips body bytes by counting them, so an upload streams through untouched
(no scan; a chunk is sliced only where a head or a body ends inside it). Timeline of one
kept-alive connection::

    open ──► head bytes … blank line ──► body (counted, not scanned) ──► next head …
    │        └ header timer armed      └ timer off; parser told "Content-Length: n"
    └ header timer armed at once: a connection that sends nothing is closed after it too

Pipelining and keep-alive need nothing special: heads are found in order in the byte stream, and
when aiohttp holds a parsed head back (its queue of pipelined requests is full) the guard holds
what follows until the parser takes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from http import HTTPStatus
from typing import Any, Protocol, cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler

from sidecar.errors import BadRequestFraming, RequestHeaderTimeout, SidecarError
from sidecar.middleware import error_response

log = logging.getLogger(__name__)

# Where the guard is in the byte stream.
HEAD, BODY, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILERS, PENDING, PASS, REFUSED = range(9)
CR, LF = 13, 10
# A chunk-size line: hex digits, then an extension (";…") or the line's end.
_CHUNK_SIZE = re.compile(rb"0*([0-9A-Fa-f]{1,16})(?:;|\r\Z)")
_CHUNK_SIZE_KEPT = 64  # bytes of a chunk-size line kept to read the size from

Feed = tuple[list[Any], bool, bytes]


class FramingError(BadHttpMessage):
    """A head the guard refuses; aiohttp turns it into a 400 like its own parser errors."""


class HeadEvents(Protocol):
    """What the guard tells its connection about the head being received."""

    def head_started(self) -> None:
        """Part of a head came and the rest has not (said once per head; a head that arrives
        whole in one read is never announced, so the common case arms no timer)."""

    def head_done(self) -> None:
        """The head is complete."""


class HeadGuard:
    """Stands in for aiohttp's request parser: checks head bytes, feeds the real one."""

    def __init__(self, parser: Any, owner: HeadEvents) -> None:
        self._parser = parser
        self._owner = owner
        self._state = HEAD
        self._line = 0  # bytes of the current line so far, its CR included
        self._cr = False  # the last byte seen was a CR
        self._lines = 0  # non-empty lines in the current head
        self._left = 0  # body or chunk bytes still to come
        self._size = b""  # the start of the current chunk-size line
        self._held = b""  # what arrived while the parser held a head back
        self._payload: Any = None  # the body stream of the request being read
        self._announced = False  # head_started was said for the current head

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)  # pause_reading, message_consumed, feed_eof, …

    def set_upgraded(self, upgraded: bool) -> None:
        """aiohttp declined an upgrade: what follows is HTTP again."""
        self._parser.set_upgraded(upgraded)
        if not upgraded and self._state == PASS:
            self._state = HEAD

    def feed_data(self, data: bytes) -> Feed:
        if self._state == PASS:
            return cast(Feed, self._parser.feed_data(data))
        if self._state == REFUSED:
            return [], False, b""
        try:
            return self._feed_data(data)
        except HttpProcessingError as exc:
            if self._state in (CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILERS):
                # A handler may be reading this body already: it fails too, as with the
                # parser's own body errors.
                self._payload.set_exception(BadRequestFraming(detail=exc.message))
            self._state = REFUSED  # nothing after a refused request is parsed
            raise

    def _feed_data(self, data: bytes) -> Feed:
        messages: list[Any] = []
        if self._state == PENDING:
            got, upgraded, tail = self._parser.feed_data(b"")
            if not got:
                self._held += data
                return messages, False, b""
            messages.extend(got)
            data, self._held = self._held + data, b""
            if self._after_head(got[-1], upgraded):
                return messages, True, tail + data
        elif not data:
            return cast(Feed, self._parser.feed_data(data))
        n, pos, fed = len(data), 0, 0
        while pos < n:
            state = self._state
            if state == HEAD:
                end = self._head_end(data, pos, n)
                if end < 0:
                    break
                got, upgraded, tail = self._parser.feed_data(
                    data if fed == 0 and end == n else data[fed:end]
                )
                messages.extend(got)
                pos = fed = end
                if not got:  # aiohttp's queue of pipelined requests is full: it parses this later
                    self._state = PENDING
                    self._held = data[end:]
                    return messages, False, b""
                if self._after_head(got[-1], upgraded):
                    return messages, True, tail + data[end:]
            elif state in (BODY, CHUNK_DATA):
                step = min(self._left, n - pos)
                pos += step
                self._left -= step
                if not self._left:
                    self._state = HEAD if state == BODY else CHUNK_END
            elif state == CHUNK_END:
                if data[pos] != (LF if self._cr else CR):
                    raise FramingError("chunk data not followed by CRLF")
                self._cr = not self._cr
                if not self._cr:
                    self._state = CHUNK_SIZE
                pos += 1
            else:  # a chunk-size or trailer line
                pos = self._chunk_line(data, pos, n)
        if fed < n:
            got, upgraded, tail = self._parser.feed_data(data if fed == 0 else data[fed:])
            if got:
                raise FramingError("the parser ended a head where the guard did not")
            if upgraded:
                self._state = PASS
                return messages, True, tail
        return messages, False, b""

    def _head_end(self, data: bytes, pos: int, n: int) -> int:
        """Scan head lines in ``data[pos:n]``: the index just past the blank line, or -1."""
        if not (self._line or self._lines) and data[pos] not in (CR, LF):
            # A whole head in this read (the usual case), found and checked at C speed: with no
            # LF before the first CRLFCRLF lacking its CR, that CRLFCRLF is the head's end.
            blank = data.find(b"\r\n\r\n", pos, n)
            if blank >= 0:
                end = blank + 4
                if data.count(b"\n", pos, end) != data.count(b"\r\n", pos, end):
                    raise FramingError("a line ends in a bare LF instead of CRLF")
                self._owner.head_done()
                return end
        while True:
            end = self._line_end(data, pos, n)
            if end < 0:
                # Blank lines before a request line are skipped (as parsers do): no head yet.
                begun = self._lines or self._line > 1 or (self._line == 1 and not self._cr)
                if begun and not self._announced:
                    self._announced = True
                    self._owner.head_started()
                return -1
            blank = self._line == 1
            self._line = 0
            pos = end
            if not blank:
                self._lines += 1
            elif self._lines:
                self._lines = 0
                self._announced = False
                self._owner.head_done()
                return end

    def _line_end(self, data: bytes, pos: int, n: int) -> int:
        """The index just past the next LF (checked to follow a CR), or -1 with the line noted."""
        lf = data.find(b"\n", pos, n)
        if lf < 0:
            self._line += n - pos
            self._cr = data[n - 1] == CR
            return -1
        if lf > pos:
            self._line += lf - pos
            self._cr = data[lf - 1] == CR
        if not (self._line and self._cr):
            raise FramingError("a line ends in a bare LF instead of CRLF")
        self._cr = False
        return lf + 1

    def _after_head(self, parsed: tuple[Any, Any], upgraded: bool) -> bool:
        """Follow the framing the parser read from the head it just parsed; True once upgraded."""
        message, payload = parsed
        self._line, self._cr, self._size, self._payload = 0, False, b"", payload
        if upgraded:
            self._state = PASS
            return True
        if payload is EMPTY_PAYLOAD:
            self._state = HEAD
        elif message.chunked:
            self._state = CHUNK_SIZE
        else:
            length = message.headers.get("Content-Length", "")
            if length.isascii() and length.isdigit():
                self._left = int(length)
                self._state = BODY if self._left else HEAD
            else:  # a body framed otherwise (CONNECT): the parser alone reads the rest
                self._state = PASS
        return False

    def _chunk_line(self, data: bytes, pos: int, n: int) -> int:
        """Scan a chunk-size or trailer line; the index after it, or ``n`` if it goes on."""
        end = self._line_end(data, pos, n)
        if self._state == CHUNK_SIZE and len(self._size) < _CHUNK_SIZE_KEPT:
            stop = n if end < 0 else end - 1  # the size line's bytes, CR included, LF not
            self._size += data[pos : min(stop, pos + _CHUNK_SIZE_KEPT - len(self._size))]
        if end < 0:
            return n
        line, self._line = self._line, 0
        if self._state == TRAILERS:
            if line == 1:  # the blank line after the trailers ends the message
                self._state = HEAD
            return end
        match = _CHUNK_SIZE.match(self._size)
        self._size = b""
        if match is None:
            raise FramingError("malformed chunk size")
        self._left = int(match.group(1), 16)
        self._state = CHUNK_DATA if self._left else TRAILERS
        return end


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol for one connection, with a ``HeadGuard`` and a header timer."""

    def __init__(self, manager: web.Server, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._head_partial = False
        self._parser = cast(Any, HeadGuard(self._parser, self))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def head_started(self) -> None:
        self._head_partial = True
        if self._header_timer is None:  # on a new connection it runs from the open already
            self._arm_header_timer()

    def head_done(self) -> None:
        self._head_partial = False
        self._disarm_header_timer()

    def _arm_header_timer(self) -> None:
        self._header_timer = self._loop.call_later(self._header_timeout_s, self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport is None or self._force_close:
            return
        log.info(
            "closed a connection from %s: no complete request head within %g s",
            self.peername,
            self._header_timeout_s,
        )
        # aiohttp's own test for "between requests": its loop waits for the next message.
        if self._waiter is None or self._waiter.done():
            self.close()  # a response is still going out (pipelining): finish it, then close
            return
        if self._head_partial:
            self.transport.write(raw_answer(RequestHeaderTimeout()))
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Requests the parser or the guard refused: the usual JSON error, then close."""
        if status != 400 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        reason = exc.message if isinstance(exc, FramingError) else type(exc).__name__
        # Not HTTP at all (TLS or a scanner on a plain port) is everyday noise on a public port.
        level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.INFO
        log.log(
            level, "refused a request from %s that could not be read: %s", request.remote, reason
        )
        request_id = uuid.uuid4().hex
        response = error_response(BadRequestFraming(detail=reason), request_id)
        response.headers["X-Request-Id"] = request_id
        response.headers["Connection"] = "close"  # said even to HTTP/1.0, for front proxies
        response.force_close()
        return response


def raw_answer(error: SidecarError) -> bytes:
    """A whole HTTP/1.1 response carrying ``error``, for where no aiohttp response can go."""
    request_id = uuid.uuid4().hex
    body = json.dumps(
        {
            "error": {
                "message": error.message,
                "type": error.type,
                "code": error.code,
                "request_id": request_id,
            }
        }
    ).encode()
    head = (
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n"
        f"X-Request-Id: {request_id}\r\n\r\n"
    )
    return head.encode() + body


class GuardedServer(web.Server):
    """aiohttp's connection factory, making ``GuardedRequestHandler``s."""

    def __init__(self, handler: Any, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout_s = header_timeout_s

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(
            self, loop=self._loop, header_timeout_s=self.header_timeout_s, **self._kwargs
        )


class GuardedAppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections are guarded (see the module docstring)."""

    def __init__(self, app: web.Application, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s

    async def _make_server(self) -> web.Server:
        # aiohttp builds the app's server (handler, request factory, handler args); the guarded
        # one takes its place with the same settings, which aiohttp keeps in ``_kwargs``.
        made = await super()._make_server()
        return GuardedServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=asyncio.get_running_loop(),
            header_timeout_s=self._header_timeout_s,
            **made._kwargs,
        )
