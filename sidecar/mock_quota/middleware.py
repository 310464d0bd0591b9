"""The emulator's middlewares: every failure in Quota's JSON shape, every request recorded.

Order (outermost first), written once in ``app.create_app``:

1. ``render_errors`` — outermost, so nothing escapes as a bare 500, not even a fault in the
   recorder; ``ApiError`` and aiohttp's HTTP errors (404, 405, 413) become Quota's shape.
2. ``record_requests`` — appends the request to ``state.requests`` *before* the handler runs,
   so requests that fail are recorded too.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from .errors import ApiError, api_error_response
from .state import MOCK_QUOTA_KEY, RecordedRequest

log = logging.getLogger(__name__)

# Control routes are the test harness talking to the emulator, not Quota traffic: recording
# them would push real calls out of the log and skew counters that tests poll.
CONTROL_PREFIX = "/_mock/"

_CODES_BY_STATUS = {
    404: ("not_found", "No such route."),
    405: ("method_not_allowed", "This route does not accept that method."),
    413: ("payload_too_large", "The request body is too large."),
}


@web.middleware
async def render_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.to_response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, message = _CODES_BY_STATUS.get(exc.status, ("invalid_request", exc.reason))
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return api_error_response(exc.status, code, message, headers=headers)
    except Exception:
        log.exception("mock Quota: unexpected error on %s %s", request.method, request.path)
        return api_error_response(
            500, "internal_error", "The Quota emulator hit an unexpected error."
        )


@web.middleware
async def record_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith(CONTROL_PREFIX):
        headers: dict[str, str] = {}
        seen: set[str] = set()
        for name in request.headers:
            if name.lower() not in seen:
                seen.add(name.lower())
                headers[name] = ", ".join(request.headers.getall(name))
        body = await request.read() if request.can_read_body else b""
        request.app[MOCK_QUOTA_KEY].record(
            RecordedRequest(request.method, request.path, request.query_string, headers, body)
        )
    return await handler(request)
