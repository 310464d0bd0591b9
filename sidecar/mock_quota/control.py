"""The ``/_mock`` control API: what tests in other processes and the demo use to steer the emulator.

    GET    /_mock/state              {counters, settings, wallets, clients}
    PATCH  /_mock/settings           JSON merge into MockSettings; unknown keys or bad values -> 400
    GET    /_mock/wallets/{email}    {email, balance}
    PUT    /_mock/wallets/{email}    {balance} -> {email, balance}
    GET    /_mock/requests           the recorded requests, oldest first (bodies as text)
    POST   /_mock/reset              clear counters and recorded requests

These routes are not Quota's: they are never recorded or counted (see ``middleware``).
"""

from __future__ import annotations

from aiohttp import web

from .body import json_object
from .errors import ApiError
from .state import MOCK_QUOTA_KEY
from .wallets import normalize_email


async def get_state(request: web.Request) -> web.Response:
    quota = request.app[MOCK_QUOTA_KEY]
    snapshot = quota.snapshot()
    snapshot["clients"] = [
        {"client_id": c.client_id, "name": c.name, "redirect_uris": list(c.redirect_uris)}
        for c in quota.clients.values()
    ]
    return web.json_response(snapshot)


async def patch_settings(request: web.Request) -> web.Response:
    quota = request.app[MOCK_QUOTA_KEY]
    changes = await json_object(request)
    try:
        quota.settings.apply(changes)
    except ValueError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from exc
    return web.json_response(quota.settings.to_json())


async def get_wallet(request: web.Request) -> web.Response:
    quota = request.app[MOCK_QUOTA_KEY]
    email = normalize_email(request.match_info["email"])
    return web.json_response({"email": email, "balance": quota.balance(email)})


async def put_wallet(request: web.Request) -> web.Response:
    quota = request.app[MOCK_QUOTA_KEY]
    email = normalize_email(request.match_info["email"])
    balance = (await json_object(request)).get("balance")
    if not isinstance(balance, int) or isinstance(balance, bool):
        raise ApiError(400, "invalid_request", "balance must be an integer number of credits.")
    quota.set_balance(email, balance)
    return web.json_response({"email": email, "balance": quota.balance(email)})


async def get_requests(request: web.Request) -> web.Response:
    quota = request.app[MOCK_QUOTA_KEY]
    return web.json_response(
        [
            {
                "method": r.method,
                "path": r.path,
                "query_string": r.query_string,
                "headers": r.headers,
                "body": r.body.decode("utf-8", errors="replace"),
            }
            for r in quota.requests
        ]
    )


async def reset(request: web.Request) -> web.Response:
    request.app[MOCK_QUOTA_KEY].reset()
    return web.Response(status=204)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/_mock/state", get_state, allow_head=False),
        web.patch("/_mock/settings", patch_settings),
        web.get("/_mock/wallets/{email}", get_wallet, allow_head=False),
        web.put("/_mock/wallets/{email}", put_wallet),
        web.get("/_mock/requests", get_requests, allow_head=False),
        web.post("/_mock/reset", reset),
    ]
