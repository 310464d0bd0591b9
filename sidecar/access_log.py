"""One access-log line per request, without the query strings of ``/auth/quota/*``.

aiohttp's default format writes the request line with its query, which on the OAuth callback
carries ``code`` and ``state``. This logger writes the path alone there (other paths keep their
query, which is the host app's business), as a JSON line with the listener's name.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from sidecar.middleware import REQUEST_ID

ACCESS_LOGGER = logging.getLogger("sidecar.access")
LISTENER = web.AppKey("listener", str)


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        path = request.path if request.path.startswith("/auth/quota/") else request.rel_url.path_qs
        self.logger.info(
            "%s %s %s",
            request.method,
            path,
            response.status,
            extra={
                "listener": request.app.get(LISTENER, "-")
                if isinstance(request, web.Request)
                else "-",
                "method": request.method,
                "path": path,
                "status": response.status,
                "bytes": response.body_length,
                "duration_ms": round(time * 1000, 2),
                "remote": request.remote,
                "request_id": request.get(REQUEST_ID, "-"),
            },
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
