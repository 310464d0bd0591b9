"""Middlewares shared by the listeners: request ids and the one place errors are rendered.

Order (outermost first), written once in ``sidecar.app``:
1. ``request_id`` — so every log line, including an error's, carries the id;
   then ``sidecar.observe``'s request metrics, so they count the status the client gets;
2. ``errors`` — renders ``SidecarError`` and anything unexpected in Quota's/OpenAI's error shape,
   ``{"error": {"message", "type", "code", "request_id"}}``, which every OpenAI SDK surfaces;
3. listener-specific guards (the internal API key) — so their refusals are rendered by (2).
"""

from __future__ import annotations

import logging
import os
import re

from aiohttp import web
from aiohttp.typedefs import Handler

from sidecar import log as sidecar_log
from sidecar.errors import MethodNotAllowed, NotFound, SidecarError

log = logging.getLogger(__name__)

REQUEST_ID = web.RequestKey("request_id", str)
_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def error_response(exc: SidecarError, request_id: str) -> web.Response:
    body = {
        "error": {
            "message": exc.message,
            "type": exc.type,
            "code": exc.code,
            "request_id": request_id,
        }
    }
    headers = {"Cache-Control": "no-store"}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    return web.json_response(body, status=exc.status, headers=headers)


@web.middleware
async def request_id(request: web.Request, handler: Handler) -> web.StreamResponse:
    incoming = request.headers.get("X-Request-Id", "")
    rid = incoming if _VALID_ID.match(incoming) else os.urandom(16).hex()
    request[REQUEST_ID] = rid
    token = sidecar_log.request_id.set(rid)
    try:
        return await handler(request)
    finally:
        sidecar_log.request_id.reset(token)


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: echo the id on every response, streamed ones included."""
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers["X-Request-Id"] = rid


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request.get(REQUEST_ID, "-")
    try:
        return await handler(request)
    except SidecarError as exc:
        level = logging.WARNING if exc.status >= 500 else logging.INFO
        log.log(
            level,
            "%s %s → %s %s",
            request.method,
            request.path,
            exc.status,
            exc.code,
            extra={"detail": exc.detail},
        )
        return error_response(exc, rid)
    except web.HTTPNotFound:
        return error_response(NotFound(), rid)
    except web.HTTPMethodNotAllowed:
        return error_response(MethodNotAllowed(), rid)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(SidecarError(), rid)
