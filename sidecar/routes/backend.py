"""Routes for the host app's backend on the internal listener: status and disconnect by header."""

from __future__ import annotations

from aiohttp import web

from sidecar.identity import header_user_key
from sidecar.routes.wallet import NO_STORE, balance_response, status_body
from sidecar.services import SERVICES


async def status(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    user_key = header_user_key(request, services)
    return web.json_response(await status_body(services, user_key), headers=NO_STORE)


async def disconnect(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    user_key = header_user_key(request, services)
    await services.tokens.disconnect(user_key)
    return web.json_response({"connected": False}, headers=NO_STORE)


async def balance(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    user_key = header_user_key(request, services)
    return await balance_response(services, user_key)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/auth/quota/status", status)
    app.router.add_post("/auth/quota/disconnect", disconnect)
    app.router.add_get("/auth/quota/balance", balance)
