"""Relay one HTTP exchange to a target and stream the answer back, byte for byte, as it comes.

Request bodies go out as they arrive (no buffering); response chunks are written to the client as
soon as the target sends them, so SSE events keep their timing. Responses are not decompressed
(the client session runs with ``auto_decompress=False``), so bytes and ``Content-Length`` stay
the target's. If the client goes away, aiohttp cancels this handler and the ``async with`` closes
the upstream connection at once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Union

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar.errors import PayloadTooLarge, SidecarError
from sidecar.forwarding.headers import filter_headers

log = logging.getLogger(__name__)

# Response headers that never go back to the client from an upstream or Quota.
_RESPONSE_DROP = ("content-length",)


Body = Union[aiohttp.StreamReader, bytes, AsyncIterator[bytes], "CountedBody", None]


class CountedBody:
    """A request body streamed on while counting, cut off past ``limit`` bytes.

    aiohttp's ``client_max_size`` is enforced only by ``read()``/``post()``; a body streamed to
    another server is not checked, so the sidecar counts it here. A declared ``Content-Length``
    over the limit is refused before anything is sent.
    """

    def __init__(self, chunks: AsyncIterator[bytes], limit: int) -> None:
        self._chunks = chunks
        self._limit = limit
        self.exceeded = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = 0
        async for chunk in self._chunks:
            size += len(chunk)
            if size > self._limit:
                self.exceeded = True
                raise PayloadTooLarge
            yield chunk


def request_body(request: web.Request, limit: int = 0) -> Body:
    """The body to send on: streamed as it arrives, counted when ``limit`` is set."""
    if not request.body_exists:
        return None
    if not limit:
        return request.content
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(detail=f"declared {request.content_length} bytes")
    return CountedBody(request.content.iter_any(), limit)


async def replayable_body(request: web.Request, limit: int, max_bytes: int) -> tuple[Body, bool]:
    """Read up to ``limit`` bytes of the body into memory so it can be sent twice.

    Returns the body and whether it is replayable. A larger body is not held: what was read is
    sent first and the rest streams on from the client (so memory stays bounded). ``max_bytes``
    (0: none) caps the whole body, counted as it streams.
    """
    if not request.body_exists:
        return None, True
    if max_bytes and request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(detail=f"declared {request.content_length} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
        if max_bytes and size > max_bytes:
            raise PayloadTooLarge
        if size > limit:
            rest = _then_rest(chunks, request.content)
            if max_bytes:
                return CountedBody(rest, max_bytes), False
            return rest, False


async def _then_rest(head: list[bytes], rest: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    async for chunk in rest.iter_any():
        yield chunk


def stream_timeout(connect_s: float, idle_s: float) -> aiohttp.ClientTimeout:
    """Timeouts that fit streams: no total, ``idle_s`` between reads, and ``connect_s`` for the
    connection — which also bounds the wait for a free pooled one, so a full pool answers 502
    instead of hanging."""
    return aiohttp.ClientTimeout(
        total=None, connect=connect_s, sock_connect=connect_s, sock_read=idle_s
    )


async def send(
    request: web.Request,
    http: aiohttp.ClientSession,
    url: URL,
    headers: CIMultiDict[str],
    *,
    timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - per-read timeouts, not a deadline
    unavailable: Callable[[str], SidecarError],
    data: Body = None,
) -> aiohttp.ClientResponse:
    """Send the request on; failures before an answer raise ``unavailable(detail)``."""
    try:
        return await http.request(
            request.method,
            url,
            headers=headers,
            data=data,
            allow_redirects=False,
            timeout=timeout,
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        )
    except PayloadTooLarge:
        raise
    except (aiohttp.ClientError, TimeoutError) as exc:
        if isinstance(data, CountedBody) and data.exceeded:
            raise PayloadTooLarge from None
        raise unavailable(f"{request.method} {url.host}: {type(exc).__name__}") from None


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
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=out)
        length = upstream.headers.get("Content-Length")
        if length is not None and length.isdigit():
            # Bodies pass through undecoded, so the target's length stays exact.
            response.content_length = int(length)
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
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
    http: aiohttp.ClientSession,
    url: URL,
    headers: CIMultiDict[str],
    *,
    timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - per-read timeouts, not a deadline
    unavailable: Callable[[str], SidecarError],
    data: Body = None,
) -> web.StreamResponse:
    """Send the request to ``url`` and stream the response back to ``request``'s client."""
    upstream = await send(
        request, http, url, headers, timeout=timeout, unavailable=unavailable, data=data
    )
    return await stream_back(request, upstream)
