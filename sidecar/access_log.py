"""One access-log line per request, without the query strings of ``/auth/quota/*``.

aiohttp's default format writes the request line with its query, which on the OAuth callback
carries ``code`` and ``state``. This logger writes the path alone there (other paths keep their
query, which is the host app's business), as a JSON line with the listener, method, route class,
status, bytes, durations (whole, waiting upstream, added by the sidecar) and the hashed user key.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from sidecar.log import SAFE_FIELDS, redact
from sidecar.middleware import REQUEST_ID
from sidecar.observe import TIMING

ACCESS_LOGGER = logging.getLogger("sidecar.access")
LISTENER = web.AppKey("listener", str)
# Methods written as they are; nothing else a client may put there goes unmasked.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        # Every field is a number, a fixed name or one of the three strings redacted below, so
        # the line skips the formatter's whole-line redaction (see sidecar.log.SAFE_FIELDS).
        raw_path = (
            request.path if request.path.startswith("/auth/quota/") else request.rel_url.path_qs
        )
        path = redact(raw_path)
        timing = request.get(TIMING)
        request_id = request.get(REQUEST_ID, "-")
        if request_id == request.headers.get("X-Request-Id"):  # the client's (else hex of ours)
            request_id = redact(request_id)
        method = request.method
        if method not in _METHODS:  # any other token a client sent
            method = redact(method)
        fields = {
            "request_id": request_id,
            "listener": request.app.get(LISTENER, "-") if isinstance(request, web.Request) else "-",
            "method": method,
            "path": path,
            "status": response.status,
            "bytes": response.body_length,
            "duration_ms": round(time * 1000, 2),
            "route": timing.route if timing else "-",
            # Waiting for Quota or the app to answer, and the sidecar's own share before the
            # response started (see sidecar.observe).
            "upstream_ms": round(timing.upstream_s * 1000, 2) if timing else None,
            "added_ms": round(timing.added_s * 1000, 2)
            if timing and timing.added_s is not None
            else None,
            # The first 16 characters of the user's HMAC key: joins log lines, names no one.
            "user": timing.user_key if timing else None,
            "remote": request.remote,
        }
        # The record is made here rather than by ``logger.info``: that would walk the stack for
        # the caller's file and line (which no format here writes) and copy every field in one
        # by one, checking each against the record's own attributes (none of them clashes).
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        record = logger.makeRecord(
            logger.name,
            logging.INFO,
            __file__,
            0,
            "%s %s %s",
            (fields["method"], path, response.status),
            None,
            "log",
        )
        record.__dict__.update(fields)
        setattr(record, SAFE_FIELDS, fields)
        logger.handle(record)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
