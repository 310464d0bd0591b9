"""``GET /auth/quota/widget.js``: the wallet's drop-in browser controls, served from the package.

The script is read once, at start-up, and served with a strong ``ETag`` and a short public cache
life, so a deploy reaches browsers within minutes and a revalidation costs one 304. It runs on
the host app's own origin and calls only the sidecar's ``/auth/quota/*`` routes there.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from aiohttp import web
from aiohttp.typedefs import Handler

WIDGET_PATH = "/auth/quota/widget.js"
CACHE_CONTROL = "public, max-age=300"


def widget_source() -> bytes:
    return resources.files("sidecar.widget").joinpath("wallet.js").read_bytes()


def widget_handler() -> Handler:
    body = widget_source()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {
        "ETag": etag,
        "Cache-Control": CACHE_CONTROL,
        "X-Content-Type-Options": "nosniff",
    }

    async def widget(request: web.Request) -> web.StreamResponse:
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=body, content_type="text/javascript", charset="utf-8", headers=headers
        )

    return widget


def add_routes(app: web.Application) -> None:
    app.router.add_get(WIDGET_PATH, widget_handler())
