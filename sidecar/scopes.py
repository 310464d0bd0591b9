"""Notices Quota refusing a grant for a scope it lacks, and marks the user ``needs_reconnect``.

Quota answers **403 ``insufficient_scope``** when a token lacks the scope a route needs
(``credits.spend`` for completions, messages, Gemini and audio; ``credits.read`` for the balance
and the model list). A refresh cannot fix that — the grant itself is too narrow — so the record
is marked ``needs_reconnect`` with the missing scope, for the status API to tell the app. A new
connect writes a record without the mark.

On forwarded ``/v1`` calls only the status is looked at, and for a 403 a copy of at most
``PEEK_MAX_BYTES`` of its JSON body, taken as it streams to the client untouched (``watch``).
The scope comes from Quota's error when it names it (the body's ``error.scope``, or the
``scope=`` of ``WWW-Authenticate``), else from the route. The mark is a compare-and-set made in
the background once the answer is sent, so it never delays or changes it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp

from sidecar.observe import QuotaErrorTap, error_code
from sidecar.services import Services
from sidecar.tokens.model import TokenRecord

CREDITS_READ = "credits.read"
CREDITS_SPEND = "credits.spend"
INSUFFICIENT_SCOPE = "insufficient_scope"
PEEK_MAX_BYTES = 4096  # Quota's error bodies are a few hundred bytes
_READ_PATHS = ("/v1/balance", "/v1/models")
_SCOPE = re.compile(r"^[a-z][a-z0-9_.:-]{0,63}$")
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_MAX_SCOPES = 8


class ErrorTap(Protocol):
    """What the forwarder does with an error answer's chunks (``observe.QuotaErrorTap``)."""

    def __call__(self, chunk: bytes) -> None: ...

    def record(self) -> None: ...


def scope_for_path(path: str) -> str:
    """The scope Quota asks for on ``path``: read for the balance and models, else spend."""
    for read_path in _READ_PATHS:
        if path == read_path or path.startswith(read_path + "/"):
            return CREDITS_READ
    return CREDITS_SPEND


def refused_scopes(body: bytes, www_authenticate: str, path: str) -> tuple[str, ...] | None:
    """The scopes a 403 says are missing, or ``None`` if it is not ``insufficient_scope``."""
    challenge = dict(_CHALLENGE_PARAM.findall(www_authenticate))
    if error_code(body) != INSUFFICIENT_SCOPE and challenge.get("error") != INSUFFICIENT_SCOPE:
        return None
    named = _named_scope(body) or challenge.get("scope", "")
    scopes = tuple(s for s in named.split() if _SCOPE.match(s))[:_MAX_SCOPES]
    return scopes or (scope_for_path(path),)


def _named_scope(body: bytes) -> str:
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return ""
    for key in ("scope", "required_scope"):
        value = error.get(key)
        if isinstance(value, str):
            return value
    return ""


class ScopeWatch:
    """Passes chunks to the metrics tap and keeps a bounded copy; on ``record`` calls ``note``."""

    def __init__(self, tap: QuotaErrorTap | None, note: Callable[[bytes], None]) -> None:
        self._tap = tap
        self._note = note
        self._chunks: list[bytes] = []
        self._size = 0

    def __call__(self, chunk: bytes) -> None:
        if self._tap is not None:
            self._tap(chunk)
        self._size += len(chunk)
        if self._size <= PEEK_MAX_BYTES:
            self._chunks.append(chunk)
        else:
            self._chunks.clear()

    def record(self) -> None:
        if self._tap is not None:
            self._tap.record()
        self._note(b"".join(self._chunks))


def watch(
    services: Services,
    user_key: str,
    record: TokenRecord,
    path: str,
    upstream: aiohttp.ClientResponse,
) -> ErrorTap | None:
    """The error tap for a forwarded answer; for a 403, one that also notes a missing scope."""
    tap = QuotaErrorTap.of(services.metrics, upstream)
    if upstream.status != 403:
        return tap
    www_authenticate = upstream.headers.get("WWW-Authenticate", "")
    readable = (
        "json" in upstream.headers.get("Content-Type", "")
        and upstream.headers.get("Content-Encoding", "identity") == "identity"
    )

    def note(body: bytes) -> None:
        missing = refused_scopes(body if readable else b"", www_authenticate, path)
        if missing is not None:
            services.tokens.mark_needs_reconnect_soon(user_key, record, missing)

    return ScopeWatch(tap, note)
