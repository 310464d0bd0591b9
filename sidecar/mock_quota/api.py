"""The ``/v1`` routes: models and balance (``credits.read``), chat (``credits.spend``)."""

from __future__ import annotations

from aiohttp import web

from .bearer import require_bearer
from .catalog import MODELS
from .chat import chat_completions
from .scopes import CREDITS_READ
from .state import MOCK_QUOTA_KEY


async def models(request: web.Request) -> web.Response:
    request.app[MOCK_QUOTA_KEY].counters["models"] += 1
    require_bearer(request, CREDITS_READ)
    return web.json_response({"object": "list", "data": [m.to_json() for m in MODELS]})


async def balance(request: web.Request) -> web.Response:
    quota = request.app[MOCK_QUOTA_KEY]
    quota.counters["balance"] += 1
    bearer = require_bearer(request, CREDITS_READ)
    return web.json_response(
        {
            "wallet": "oauth_user",
            "balance": quota.balance(bearer.email),
            "plan": "free",
            "user_id": bearer.user_id,
            "billing_mode": "user",
        }
    )


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/models", models, allow_head=False),
        web.get("/v1/balance", balance, allow_head=False),
        web.post("/v1/chat/completions", chat_completions),
    ]
