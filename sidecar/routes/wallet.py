"""Wallet reads shared by the browser routes and the backend routes: status and balance."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from sidecar.errors import QuotaUnavailable
from sidecar.services import Services

NO_STORE = {"Cache-Control": "no-store"}


async def status_body(services: Services, user_key: str) -> dict[str, Any]:
    record = await services.tokens.current(user_key)
    if record is None:
        return {"connected": False, "scopes": [], "expires_at": None}
    return {"connected": True, "scopes": list(record.scopes), "expires_at": int(record.expires_at)}


async def balance_response(services: Services, user_key: str) -> web.Response:
    """Quota's ``/v1/balance`` for this user, passed through; one retry after a refused token."""
    record = await services.tokens.fresh(user_key)
    status, body = await _balance(services, record.access_token)
    if status == 401:
        record = await services.tokens.after_rejection(user_key, record)
        status, body = await _balance(services, record.access_token)
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
