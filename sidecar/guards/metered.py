"""One /v1 call, metered: admitted by the guards, its usage read as it streams, then settled.

``metered(forward)`` wraps the /v1 forwarder. For each call:

1. with guards on, ``admit``: the spend guard (billed calls), then a stream slot — a refusal is a
   429 before anything reaches Quota;
2. the forwarder, holding Quota's answer, asks ``watch_usage`` for an observer of its chunks
   (``sidecar.forwarding.usage``: a side copy; the client's bytes are untouched);
3. at the end — answered, failed, or cancelled because the client left — the usage is counted
   (``quota_sidecar_usage_*``), announced as a ``sidecar.usage`` host-app event, added to the
   user's spend window, and the slot is given back.

Billed calls are the POSTs: Quota bills model calls, never reads (``GET /v1/models``,
``/v1/balance``); a WebSocket (the realtime route) is checked against the spend limit and holds
a slot, but Quota sends no usage on it. With every guard off, a GET costs one comparison here,
and a POST one small object plus, for a 200 JSON or event-stream answer, the observer.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from sidecar.forwarding.usage import Unreadable, Usage, UsageObserver, observer_for
from sidecar.forwarding.websocket import is_upgrade
from sidecar.identity import header_identity, header_user_key
from sidecar.services import SERVICES, Services

USAGE_EVENT = "sidecar.usage"

# Path -> billed endpoint (a bounded label; metrics.USAGE_ENDPOINTS). Exact paths, then prefixes.
_EXACT_ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/messages": "messages",
    "/v1/responses": "responses",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
_PREFIX_ENDPOINTS = (("/v1/audio/", "audio"), ("/v1/images/", "images"), ("/v1beta/", "gemini"))
_GEMINI_MODEL_PREFIX = "/v1beta/models/"
_MODEL_MAX_CHARS = 128


@dataclass(slots=True)
class BilledCall:
    """What one billed call's forwarder leaves for its settlement: the usage observer."""

    observer: UsageObserver | None = None


BILLED_CALL = web.RequestKey("billed_call", BilledCall)


def endpoint_of(path: str) -> str:
    """Which billed endpoint a /v1 path is (``chat``, ``messages``, …, ``other``)."""
    endpoint = _EXACT_ENDPOINTS.get(path)
    if endpoint is not None:
        return endpoint
    for prefix, name in _PREFIX_ENDPOINTS:
        if path.startswith(prefix):
            return name
    return "other"


def watch_usage(
    request: web.Request, upstream: aiohttp.ClientResponse
) -> Callable[[bytes], None] | None:
    """What to feed each chunk of Quota's answer to (``None``: nothing to read in it)."""
    call = request.get(BILLED_CALL)
    if call is None:
        return None
    call.observer = observer = observer_for(upstream.status, upstream.headers)
    if observer is None or isinstance(observer, Unreadable):
        return None
    return observer.feed


def metered(handler: Handler) -> Handler:
    """``handler`` (the /v1 forwarder) with the guards around it and its usage accounted."""

    async def metered_call(request: web.Request) -> web.StreamResponse:
        services = request.app[SERVICES]
        guards = services.guards
        billed = request.method == "POST"
        if guards is None and not billed:
            return await handler(request)
        call = BilledCall() if billed else None
        if call is not None:
            request[BILLED_CALL] = call
        user_key = call_id = ""
        slot = False
        if guards is not None:
            user_key = header_user_key(request, services)
            call_id = secrets.token_hex(8)
            slot = await guards.admit(user_key, call_id, billed=billed or is_upgrade(request))
        cancelled = False
        try:
            return await handler(request)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            usage: Usage | None = None
            try:
                usage = account(request, services, call, cancelled=cancelled)
            finally:
                if guards is not None:
                    credits = usage.credits_used if usage is not None else 0
                    await guards.settle(user_key, call_id, slot=slot, credits_used=credits)

    return metered_call


def account(
    request: web.Request, services: Services, call: BilledCall | None, *, cancelled: bool
) -> Usage | None:
    """Count one billed call's usage in the metrics and announce it; ``None`` if unread."""
    observer = call.observer if call is not None else None
    if observer is None:
        return None  # no 200 answer from Quota: nothing was billed
    endpoint = endpoint_of(request.path)
    usage = observer.finish()
    if usage is None:
        reason = "client_closed" if cancelled else (observer.unread or "no_quota_block")
        services.metrics.usage_not_read(endpoint, reason)
        return None
    services.metrics.usage_read(
        endpoint, usage.credits_used, usage.prompt_tokens, usage.completion_tokens
    )
    if services.events.enabled:
        services.events.emit(
            USAGE_EVENT,
            {
                "credits_used": usage.credits_used,
                "balance_after": usage.balance_after,
                "tokens": {
                    "prompt": usage.prompt_tokens,
                    "completion": usage.completion_tokens,
                    "total": usage.tokens,
                },
                "route": endpoint,
                "model": usage.model or model_in_path(request.path),
            },
            user=header_identity(request, services),
        )
    return usage


def model_in_path(path: str) -> str | None:
    """Gemini names the model in the path: ``/v1beta/models/<model>:generateContent``."""
    if not path.startswith(_GEMINI_MODEL_PREFIX):
        return None
    model = path[len(_GEMINI_MODEL_PREFIX) :].partition(":")[0].partition("/")[0]
    return model if 0 < len(model) <= _MODEL_MAX_CHARS and model.isprintable() else None
