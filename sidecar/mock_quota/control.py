"""The ``/_mock`` control API: what tests in other processes and the demo use to steer the emulator.

    GET    /_mock/state              {counters, settings, wallets, clients}
    PATCH  /_mock/settings           JSON merge into MockSettings; unknown keys or bad values -> 400
    GET    /_mock/wallets/{email}    {email, balance}
    PUT    /_mock/wallets/{email}    {balance} -> {email, balance}; sends balance.updated
    GET    /_mock/requests           the recorded requests, oldest first (bodies as text)
    GET    /_mock/webhooks           the webhook deliveries, oldest first:
                                     {id, type, url, status, attempts, error, done, body}
    POST   /_mock/webhooks/send      {type, data, id?, created_at?} -> 202 and the delivery;
                                     409 webhooks_not_configured while webhook_url is unset
    POST   /_mock/users/{user_id}/disconnect
                                     the user disconnects the app(s) in Quota's dashboard: every
                                     grant of theirs is revoked and user.disconnected is sent
                                     once per client -> {user_id, clients, revoked_grants}
    POST   /_mock/reset              clear counters, recorded requests and webhook deliveries

These routes are not Quota's: they are never recorded nor counted as requests (see
``middleware``).
"""

from __future__ import annotations

from aiohttp import web

from . import events
from .body import json_object
from .errors import ApiError
from .state import MOCK_QUOTA_KEY
from .wallets import normalize_email, user_id_for
from .webhooks import WEBHOOKS_KEY, new_event_id


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
    events.balance_updated(request.app[WEBHOOKS_KEY], email, balance)
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


async def get_webhooks(request: web.Request) -> web.Response:
    sender = request.app[WEBHOOKS_KEY]
    return web.json_response([delivery.to_json() for delivery in sender.deliveries])


def _envelope(body: dict[str, object], now: float) -> dict[str, object]:
    """The event ``body`` asks for, with a fresh id and the current time unless it names them."""
    problems: list[str] = []
    event_type, data = body.get("type"), body.get("data", {})
    event_id, created_at = body.get("id", new_event_id()), body.get("created_at", int(now))
    if not isinstance(event_type, str) or not event_type:
        problems.append("type must be a non-empty string")
    if not isinstance(data, dict):
        problems.append("data must be an object")
    if not isinstance(event_id, str) or not event_id:
        problems.append("id must be a non-empty string")
    if not isinstance(created_at, int) or isinstance(created_at, bool):
        problems.append("created_at must be an integer (unix seconds)")
    if problems:
        raise ApiError(400, "invalid_request", "; ".join(problems) + ".")
    return {"id": event_id, "type": event_type, "created_at": created_at, "data": data}


async def send_webhook(request: web.Request) -> web.Response:
    quota = request.app[MOCK_QUOTA_KEY]
    envelope = _envelope(await json_object(request), quota.clock())
    delivery = request.app[WEBHOOKS_KEY].send(envelope)
    if delivery is None:
        raise ApiError(
            409,
            "webhooks_not_configured",
            'No webhook_url is set: PATCH /_mock/settings {"webhook_url": "http://…"} first.',
        )
    return web.json_response(delivery.to_json(), status=202)


async def disconnect_user(request: web.Request) -> web.Response:
    """Quota's dashboard "Disconnect": the user withdraws every app's access at once."""
    quota = request.app[MOCK_QUOTA_KEY]
    user_id = request.match_info["user_id"]
    if "@" in user_id:  # an email is accepted too, for convenience
        user_id = user_id_for(user_id)
    if not quota.grants.knows_user(user_id):
        raise ApiError(404, "unknown_user", f"No grant was ever issued to {user_id}.")
    stopped = quota.grants.revoke_user(user_id)
    clients = list(dict.fromkeys(grant.client_id for grant in stopped))
    quota.counters["users.disconnected"] += 1
    for client_id in clients:
        events.user_disconnected(request.app[WEBHOOKS_KEY], user_id, client_id)
    return web.json_response(
        {"user_id": user_id, "clients": clients, "revoked_grants": len(stopped)}
    )


async def reset(request: web.Request) -> web.Response:
    request.app[MOCK_QUOTA_KEY].reset()
    request.app[WEBHOOKS_KEY].deliveries.clear()
    return web.Response(status=204)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/_mock/state", get_state, allow_head=False),
        web.patch("/_mock/settings", patch_settings),
        web.get("/_mock/wallets/{email}", get_wallet, allow_head=False),
        web.put("/_mock/wallets/{email}", put_wallet),
        web.get("/_mock/requests", get_requests, allow_head=False),
        web.get("/_mock/webhooks", get_webhooks, allow_head=False),
        web.post("/_mock/webhooks/send", send_webhook),
        web.post("/_mock/users/{user_id}/disconnect", disconnect_user),
        web.post("/_mock/reset", reset),
    ]
