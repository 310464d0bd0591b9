"""The emulator's WebSocket voice route: authenticated like any /v1 call, then an echo.

Quota documents a WebSocket voice route without naming its path; the emulator serves it at
``/v1/realtime`` so the sidecar's WebSocket forwarding on the internal listener can be proven:
the bearer must be a valid access token with ``credits.spend``, each text frame comes back as
``{"type": "echo", "text": …, "user_id": …}``, binary frames come back as they are, and a text
frame ``close:<code>`` makes the emulator close with that code.
"""

from __future__ import annotations

import json

from aiohttp import WSMsgType, web

from .bearer import require_bearer
from .scopes import CREDITS_SPEND
from .state import MOCK_QUOTA_KEY


async def realtime(request: web.Request) -> web.StreamResponse:
    quota = request.app[MOCK_QUOTA_KEY]
    caller = require_bearer(request, CREDITS_SPEND)  # before the upgrade: a refusal is plain HTTP
    quota.counters["realtime.sessions"] += 1
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT and msg.data.startswith("close:"):
            await ws.close(code=int(msg.data[6:]))
        elif msg.type is WSMsgType.TEXT:
            await ws.send_str(
                json.dumps({"type": "echo", "text": msg.data, "user_id": caller.user_id})
            )
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


def routes() -> list[web.RouteDef]:
    return [web.get("/v1/realtime", realtime)]
