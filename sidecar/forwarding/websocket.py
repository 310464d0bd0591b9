"""Pass WebSocket connections through: upgrade detection and a two-way message pump.

A request is an upgrade when its ``Connection`` header *lists* ``upgrade`` among any other tokens
(browsers send ``Connection: keep-alive, Upgrade``) and ``Upgrade`` names ``websocket``. The
sidecar opens the upstream WebSocket first — so a refusal there reaches the client as the
upstream's own HTTP answer — then accepts the client's with the subprotocol the upstream chose.
Both sides run without auto-ping or auto-close: pings and pongs are forwarded as they are, and a
close code from either side is passed to the other before the close is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from sidecar.errors import SidecarError

log = logging.getLogger(__name__)

# The client's handshake headers; aiohttp makes its own for the upstream leg.
HANDSHAKE = (
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
)
_GOING_AWAY = 1001
CLOSE_GRACE_S = 10.0
_INTERNAL_ERROR = 1011


def is_upgrade(request: web.BaseRequest) -> bool:
    tokens = {
        token.strip().lower()
        for value in request.headers.getall("Connection", [])
        for token in value.split(",")
    }
    return "upgrade" in tokens and request.headers.get("Upgrade", "").lower() == "websocket"


def requested_protocols(request: web.BaseRequest) -> tuple[str, ...]:
    return tuple(
        p.strip()
        for value in request.headers.getall("Sec-WebSocket-Protocol", [])
        for p in value.split(",")
        if p.strip()
    )


async def relay_websocket(
    request: web.Request,
    http: aiohttp.ClientSession,
    url: URL,
    headers: CIMultiDict[str],
    *,
    connect_timeout_s: float,
    unavailable: type[SidecarError] | None = None,
) -> web.StreamResponse:
    """Open the upstream WebSocket (within ``connect_timeout_s``), then pump both ways.

    ``headers`` are the request headers as forwarded; the client's handshake headers are dropped
    here, since aiohttp makes its own for the upstream leg.
    """
    headers = headers.copy()
    for name in HANDSHAKE:
        headers.popall(name, None)
    protocols = requested_protocols(request)
    ws_url = url.with_scheme("wss" if url.scheme == "https" else "ws")
    try:
        async with asyncio.timeout(connect_timeout_s):  # connect and the handshake's answer
            upstream = await http.ws_connect(
                ws_url,
                headers=headers,
                protocols=protocols,
                autoping=False,
                autoclose=False,
                timeout=aiohttp.ClientWSTimeout(ws_close=10),
                max_msg_size=0,
            )
    except aiohttp.WSServerHandshakeError as exc:
        # The upstream refused the upgrade: answer with its status, as a plain proxy would.
        return web.Response(status=exc.status or 502, text=exc.message or "")
    except (aiohttp.ClientError, TimeoutError) as exc:
        err = unavailable or SidecarError
        raise err(detail=f"websocket to {url.host}: {type(exc).__name__}") from None

    client = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        autoping=False,
        autoclose=False,
        max_msg_size=0,
    )
    await client.prepare(request)
    to_upstream = asyncio.create_task(_pump(client, upstream))
    to_client = asyncio.create_task(_pump(upstream, client))
    try:
        _, pending = await asyncio.wait(
            {to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED
        )
        if pending:  # let the other direction finish its closing handshake
            await asyncio.wait(pending, timeout=CLOSE_GRACE_S)
    finally:
        for task in (to_upstream, to_client):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await upstream.close()
        await client.close()
    return client


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    """Copy messages until ``source`` closes, then close ``sink`` with the same code.

    Neither side auto-closes: a close is passed on first and acknowledged after, so the peer
    that closed does not hang up (and cancel this handler) before the other peer heard of it.
    """
    while True:
        msg = await source.receive()
        if msg.type is WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif msg.type is WSMsgType.PING:
            await sink.ping(msg.data)
        elif msg.type is WSMsgType.PONG:
            await sink.pong(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            break  # the peer closed: pass it on, then acknowledge
        elif msg.type is WSMsgType.ERROR:
            log.info("websocket error: %s", type(source.exception()).__name__)
            await sink.close(code=_INTERNAL_ERROR)
            return
        else:
            return  # CLOSING/CLOSED: the other direction is closing this end
    code = source.close_code if source.close_code is not None else _GOING_AWAY
    if not sink.closed:
        await sink.close(code=code, message=b"")
    if not source.closed:
        await source.close(code=code)  # acknowledge the close we received
