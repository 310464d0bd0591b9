"""Relay one HTTP exchange to a target and stream the answer back, byte for byte, as it comes.

Request bodies go out as they arrive (no buffering); response chunks are written to the client as
soon as the target sends them, so SSE events keep their timing. Responses are not decompressed
(the client session runs with ``auto_decompress=False``), so bytes and ``Content-Length`` stay
the target's. If the client goes away, aiohttp cancels this handler and the ``async with`` closes
the upstream connection at once.

Timeouts fit streams (``StreamTimeouts``); there is never a total::

    connect ──► send the request (as fast as the client gives it) ──► wait ──► headers ──► body
    └ connect_s (also the wait for a free pooled connection)          │                   │
                                                     first_byte_s ────┘   idle_s between reads
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Union

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar.errors import (
    PayloadTooLarge,
    QuotaUnavailable,
    RequestBodyTimeout,
    UpstreamUnavailable,
)
from sidecar.forwarding.headers import filter_headers
from sidecar.observe import ObservedSession

log = logging.getLogger(__name__)

# Response headers that never go back to the client from an upstream or Quota.
_RESPONSE_DROP = ("content-length",)


Body = Union[aiohttp.StreamReader, bytes, AsyncIterator[bytes], "CountedBody", None]


class CountedBody:
    """A request body streamed on while counting and timing it.

    Cut off past ``limit`` bytes (0: no limit): aiohttp's ``client_max_size`` is enforced only by
    ``read()``/``post()``, and a body streamed to another server is not checked, so the sidecar
    counts it here (a declared ``Content-Length`` over the limit is refused before anything is
    sent). Cut off too when the client sends nothing for ``idle_s`` (0: no bound), so a slow
    sender cannot hold a connection to the app or Quota. ``failure`` keeps the reason, since
    aiohttp may wrap what the body raised in its own client error.
    """

    def __init__(self, chunks: AsyncIterator[bytes], limit: int, idle_s: float = 0.0) -> None:
        self._chunks = chunks
        self._limit = limit
        self._idle_s = idle_s
        self.failure: PayloadTooLarge | RequestBodyTimeout | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = 0
        chunks = aiter(self._chunks)
        while True:
            try:
                if self._idle_s:
                    async with asyncio.timeout(self._idle_s):
                        chunk = await anext(chunks)
                else:
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                self.failure = RequestBodyTimeout(detail=f"after {size} bytes")
                raise self.failure from None
            size += len(chunk)
            if self._limit and size > self._limit:
                self.failure = PayloadTooLarge()
                raise self.failure
            yield chunk


def request_body(request: web.Request, limit: int = 0, idle_s: float = 0.0) -> Body:
    """The body to send on: streamed as it arrives, counted and timed when asked to."""
    if not request.body_exists:
        return None
    if not limit and not idle_s:
        return request.content
    if limit and request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(detail=f"declared {request.content_length} bytes")
    return CountedBody(request.content.iter_any(), limit, idle_s)


async def replayable_body(
    request: web.Request, limit: int, max_bytes: int, idle_s: float = 0.0
) -> tuple[Body, bool]:
    """Read up to ``limit`` bytes of the body into memory so it can be sent twice.

    Returns the body and whether it is replayable. A larger body is not held: what was read is
    sent first and the rest streams on from the client (so memory stays bounded). ``max_bytes``
    (0: none) caps the whole body, counted as it streams; ``idle_s`` (0: none) bounds each wait
    for the client's next bytes.
    """
    if not request.body_exists:
        return None, True
    if max_bytes and request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(detail=f"declared {request.content_length} bytes")
    content = request.content
    chunks: list[bytes] = []
    size = 0
    while True:
        # What has arrived already is taken without a wait, so without a timer: a small body
        # usually comes in the same read as the head.
        chunk = content.read_nowait()
        if not chunk and not content.is_eof():
            try:
                async with asyncio.timeout(idle_s or None):
                    chunk = await content.readany()
            except TimeoutError:
                raise RequestBodyTimeout(detail=f"after {size} bytes") from None
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
        if max_bytes and size > max_bytes:
            raise PayloadTooLarge
        if size > limit:
            rest = _then_rest(chunks, content)
            if max_bytes or idle_s:
                return CountedBody(rest, max_bytes, idle_s), False
            return rest, False


async def _then_rest(head: list[bytes], rest: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    async for chunk in rest.iter_any():
        yield chunk


@dataclass(frozen=True, slots=True)
class StreamTimeouts:
    """Connect, first byte, idle: each phase of one exchange bounded on its own, none in total.

    ``connect_s`` also bounds the wait for a free pooled connection, so a full pool answers 502
    instead of hanging. ``first_byte_s`` runs from the moment the whole request was sent (a slow
    upload does not count) until the answer starts; ``idle_s`` then bounds each silence in the
    body, so a healthy stream is never cut however long it lasts.
    """

    connect_s: float
    first_byte_s: float
    idle_s: float
    _client: aiohttp.ClientTimeout = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # aiohttp starts sock_read once the request is fully written and restarts it on every
        # read: until the headers it is the first-byte wait; ``send`` then sets it to idle_s.
        client = aiohttp.ClientTimeout(
            total=None,
            connect=self.connect_s,
            sock_connect=self.connect_s,
            sock_read=self.first_byte_s,
        )
        object.__setattr__(self, "_client", client)

    def client_timeout(self) -> aiohttp.ClientTimeout:
        return self._client


@functools.lru_cache(maxsize=16)
def stream_timeout(
    connect_s: float, idle_s: float, first_byte_s: float | None = None
) -> StreamTimeouts:
    """Timeouts for one relayed exchange; without ``first_byte_s`` the wait for the answer is
    ``idle_s`` too. The same settings give the same (immutable) object, made once."""
    return StreamTimeouts(
        connect_s=connect_s,
        first_byte_s=idle_s if first_byte_s is None else first_byte_s,
        idle_s=idle_s,
    )


def _idle_from_now(response: aiohttp.ClientResponse, idle_s: float) -> None:
    """The headers are in: from now on each read may wait ``idle_s``, not the first-byte time."""
    connection = response.connection
    protocol = connection.protocol if connection is not None else None
    if protocol is None:
        return  # the whole answer is in and its connection released
    protocol.read_timeout = idle_s
    if not response.content.is_eof():
        protocol.start_timeout()  # restart the read timer now, with idle_s


async def send(
    request: web.Request,
    session: ObservedSession,
    url: URL,
    headers: CIMultiDict[str],
    *,
    timeout: StreamTimeouts,  # noqa: ASYNC109 - per-phase timeouts, not a deadline
    unavailable: Callable[[str], QuotaUnavailable | UpstreamUnavailable],
    data: Body = None,
) -> aiohttp.ClientResponse:
    """Send the request on; failures before an answer raise ``unavailable(detail)``, and no
    answer within ``timeout.first_byte_s`` its 504 form (the call is cancelled: aiohttp closes
    the connection). The call is stamped with the request id and timed to its answer's headers
    here (``session.calls``), as the traced sessions' calls are by their trace."""
    calls = session.calls
    calls.stamp(headers)
    call = calls.classify(url)
    started = time.perf_counter()
    try:
        try:
            response = await session.http.request(
                request.method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=timeout.client_timeout(),
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            )
        except BaseException as exc:
            calls.failed(call, started, exc)
            raise
    except (PayloadTooLarge, RequestBodyTimeout):
        raise
    except (aiohttp.ClientError, TimeoutError) as exc:
        if isinstance(data, CountedBody) and data.failure is not None:
            raise data.failure from None
        if isinstance(exc, aiohttp.SocketTimeoutError):  # sock_read before the headers
            waited = f"no answer {timeout.first_byte_s:g} s after the request was sent"
            raise unavailable(f"{request.method} {url.host}: {waited}").timed_out() from None
        raise unavailable(f"{request.method} {url.host}: {type(exc).__name__}") from None
    calls.answered(call, started, response)
    _idle_from_now(response, timeout.idle_s)
    return response


class _WholeResponse(web.StreamResponse):
    """A streamed response whose headers wait for its first body bytes (or its end) and leave
    in the same write, as ``web.Response``'s do: for an answer with nothing left to wait for."""

    _send_headers_immediately = False


async def stream_back(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    *,
    adjust_response: Callable[[CIMultiDict[str], aiohttp.ClientResponse], None] | None = None,
    on_chunk: Callable[[bytes], None] | None = None,
) -> web.StreamResponse:
    """Stream ``upstream``'s answer to the client as it arrives, then release it.

    ``on_chunk`` sees each chunk before it is written (the metrics read small error bodies).

    A failure mid-stream can no longer change the status, so the client connection is cut (a
    truncated body must not look complete).
    """
    async with upstream:
        out = filter_headers(upstream.headers, drop=_RESPONSE_DROP)
        if adjust_response is not None:
            adjust_response(out, upstream)
        # An answer already in whole (a small JSON body comes with its headers) leaves in one
        # write; otherwise the headers go at once and the body follows as it comes.
        kind = _WholeResponse if upstream.content.is_eof() else web.StreamResponse
        response = kind(status=upstream.status, reason=upstream.reason, headers=out)
        length = upstream.headers.get("Content-Length")
        if length is not None and length.isdigit():
            # Bodies pass through undecoded, so the target's length stays exact.
            response.content_length = int(length)
        await response.prepare(request)
        try:
            # One write per HTTP chunk of the answer, as it was framed: chunks that arrive
            # together are not merged, so an SSE event sent alone reaches the client alone.
            # Not ``iter_chunks()``: a body-less answer (204, 304, HEAD) reads from aiohttp's
            # shared empty stream, which after its first use never signals the end to it.
            content = upstream.content
            while True:
                chunk, _ = await content.readchunk()
                if not chunk:
                    if content.at_eof():
                        break
                    continue  # a chunk boundary with no data before it
                if on_chunk is not None:
                    on_chunk(chunk)
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("upstream stream broke after the response started: %s", type(exc).__name__)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response


async def relay(
    request: web.Request,
    session: ObservedSession,
    url: URL,
    headers: CIMultiDict[str],
    *,
    timeout: StreamTimeouts,  # noqa: ASYNC109 - per-phase timeouts, not a deadline
    unavailable: Callable[[str], QuotaUnavailable | UpstreamUnavailable],
    data: Body = None,
) -> web.StreamResponse:
    """Send the request to ``url`` and stream the response back to ``request``'s client."""
    upstream = await send(
        request, session, url, headers, timeout=timeout, unavailable=unavailable, data=data
    )
    return await stream_back(request, upstream)
