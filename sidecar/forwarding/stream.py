"""Relay one HTTP exchange to a target and stream the answer back, byte for byte, as it comes.

Request bodies go out as they arrive (no buffering); response chunks are written to the client as
soon as the target sends them, so SSE events keep their timing. Responses are not decompressed
(the client session runs with ``auto_decompress=False``), so bytes and ``Content-Length`` stay
the target's. If the client goes away, aiohttp cancels this handler and the ``async with`` closes
the upstream connection at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar.errors import SidecarError
from sidecar.forwarding.headers import filter_headers

log = logging.getLogger(__name__)

# Response headers that never go back to the client from an upstream or Quota.
_RESPONSE_DROP = ("content-length",)


def request_body(request: web.Request) -> aiohttp.StreamReader | None:
    return request.content if request.body_exists else None


async def relay(
    request: web.Request,
    http: aiohttp.ClientSession,
    url: URL,
    headers: CIMultiDict[str],
    *,
    timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - per-read timeouts, not a deadline
    unavailable: Callable[[str], SidecarError],
    data: aiohttp.StreamReader | bytes | None = None,
    adjust_response: Callable[[CIMultiDict[str], aiohttp.ClientResponse], None] | None = None,
) -> web.StreamResponse:
    """Send the request to ``url`` and stream the response back to ``request``'s client.

    Failures before any byte reached the client raise ``unavailable(detail)``; a failure
    mid-stream can no longer change the status, so the client connection is cut (a truncated
    body must not look complete).
    """
    try:
        upstream = await http.request(
            request.method,
            url,
            headers=headers,
            data=data,
            allow_redirects=False,
            timeout=timeout,
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise unavailable(f"{request.method} {url.host}: {type(exc).__name__}") from None

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
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("upstream stream broke after the response started: %s", type(exc).__name__)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response
