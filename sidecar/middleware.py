"""Each listener's one middleware: request ids, the request metrics, and where errors are rendered.

In this order (outermost first), in the one frame ``for_listener`` builds:
1. the request id — so every log line, including an error's, carries it;
2. ``sidecar.observe``'s request metrics — so they count the status the client gets;
3. error rendering — ``SidecarError`` and anything unexpected in Quota's/OpenAI's error shape,
   ``{"error": {"message", "type", "code", "request_id"}}``, which every OpenAI SDK surfaces;
4. the listener's own check (the internal API key) — so its refusals are rendered by (3).

One middleware rather than one per step: aiohttp runs each middleware as a coroutine that stays
suspended for as long as its request runs, so every step would hold a frame (and its context
tokens) through a whole stream: with 1,000 streams open, three more middlewares cost about 2 MB.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from sidecar import log as sidecar_log
from sidecar import observe
from sidecar.errors import MethodNotAllowed, NotFound, SidecarError
from sidecar.metrics import Metrics

log = logging.getLogger(__name__)

REQUEST_ID = web.RequestKey("request_id", str)
_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

# A listener's own check: returns to admit the request, raises a ``SidecarError`` to refuse it.
Check = Callable[[web.Request], None]


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


def for_listener(listener: str, metrics: Metrics, *, check: Check | None = None) -> Middleware:
    """The middleware of ``listener``: the four steps of the module docstring, in that order."""
    watch = observe.RequestWatch(listener, metrics)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        incoming = request.headers.get("X-Request-Id", "")
        rid = incoming if _VALID_ID.match(incoming) else os.urandom(16).hex()
        request[REQUEST_ID] = rid
        rid_token = sidecar_log.request_id.set(rid)
        timing, timing_token = watch.start(request)
        status = 500
        try:
            try:
                if check is not None:
                    check(request)
                response = await handler(request)
            except SidecarError as exc:
                response = _render(request, exc, rid)
            except web.HTTPNotFound:
                response = error_response(NotFound(), rid)
            except web.HTTPMethodNotAllowed:
                response = error_response(MethodNotAllowed(), rid)
            except web.HTTPException:
                raise
            except Exception:
                log.exception("unexpected error on %s %s", request.method, request.path)
                response = error_response(SidecarError(), rid)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = observe.CLIENT_CLOSED
            raise
        finally:
            watch.finish(timing, timing_token, status)
            sidecar_log.request_id.reset(rid_token)

    return middleware


def _render(request: web.Request, exc: SidecarError, rid: str) -> web.Response:
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


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: echo the id on every response, streamed ones included."""
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers["X-Request-Id"] = rid
