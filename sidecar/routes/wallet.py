"""Wallet reads shared by the browser routes and the backend routes: status and balance.

A connection is in one of three states: ``connected``; ``needs_reconnect`` (tokens are kept, but
Quota refused them for a scope the grant lacks, which only a new connect fixes); or
``not_connected``.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from sidecar import scopes
from sidecar.errors import QuotaUnavailable
from sidecar.services import Services
from sidecar.tokens.model import TokenRecord

NO_STORE = {"Cache-Control": "no-store"}


def connection_state(record: TokenRecord | None) -> str:
    if record is None:
        return "not_connected"
    return "needs_reconnect" if record.needs_reconnect else "connected"


async def status_body(services: Services, user_key: str) -> dict[str, Any]:
    record = await services.tokens.current(user_key)
    if record is None:
        return {
            "connected": False,
            "scopes": [],
            "expires_at": None,
            "state": "not_connected",
            "needs_reconnect": False,
        }
    return {
        "connected": True,
        "scopes": list(record.scopes),
        "expires_at": int(record.expires_at),
        "state": connection_state(record),
        "needs_reconnect": record.needs_reconnect,
    }


async def balance_response(services: Services, user_key: str) -> web.Response:
    """Quota's ``/v1/balance`` for this user, passed through; one retry after a refused token.

    A 403 ``insufficient_scope`` marks the record ``needs_reconnect`` (``sidecar.scopes``).
    """
    record = await services.tokens.fresh(user_key)
    status, body = await _balance(services, record.access_token)
    if status == 401:
        record = await services.tokens.after_rejection(user_key, record)
        status, body = await _balance(services, record.access_token)
    if status == 403:
        missing = scopes.refused_scopes(body, "", "/v1/balance")
        if missing is not None:
            await services.tokens.mark_needs_reconnect(user_key, record, missing)
    return web.Response(status=status, body=body, content_type="application/json", headers=NO_STORE)


async def _balance(services: Services, access_token: str) -> tuple[int, bytes]:
    status, body, _ = await services.quota.get_json("/v1/balance", access_token)
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if status >= 500 or not isinstance(parsed, dict):
        raise QuotaUnavailable(detail=f"balance answered {status} with an unreadable body")
    return status, body
