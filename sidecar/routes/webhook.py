"""Receives Quota's webhooks: verify, refuse replays, forget disconnected grants, pass them on.

``POST /auth/quota/webhook`` on the public listener, where Quota can reach it. No browser and no
user is involved: the route takes no cookie, makes no identity probe and has no Origin check —
the signature is the only credential. Checks, in order; each refusal answers its code and
changes nothing:

    webhooks.secret unset                                    404 webhooks_not_configured
    body over MAX_BODY_BYTES (counted as it arrives)         413 payload_too_large
    X-Quota-Signature missing, or not the hex HMAC-SHA256
      of the raw body under the secret (constant time)       401 webhook_signature_invalid
    not an envelope {id: "evt_…", type, created_at, data}    400 invalid_request
    created_at older than webhooks.max_age_s, or more
      than WEBHOOK_FUTURE_SKEW_S in the future                400 webhook_stale
    the id was already received (webhooks.replay_window_s)   409 webhook_replayed

A replay is answered 409, not 200: a captured delivery sent again is an attack or a fault worth
seeing in Quota's delivery log and in ours, and Quota stops retrying after its few attempts
either way. Ids are claimed in the token store (``SET NX``), so every replica refuses a replay.
If the store fails after the claim, the claim is released and the answer is 503, so Quota's
retry is processed.

Then: ``user.disconnected`` forgets the grant of every user whose record carries that Quota
user id (Quota already revoked it, so nothing is revoked here). Events for another OAuth client
(``data.client_id`` not ours) are acknowledged and ignored. Known event types go on to the host
app through ``services.events.forward`` (``sidecar.hooks``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from typing import Any

from aiohttp import web

from sidecar.config import WEBHOOK_FUTURE_SKEW_S
from sidecar.errors import (
    BadRequest,
    PayloadTooLarge,
    SidecarError,
    StoreUnavailable,
    WebhookReplayed,
    WebhookSignatureInvalid,
    WebhooksNotConfigured,
    WebhookStale,
)
from sidecar.routes.wallet import NO_STORE
from sidecar.services import SERVICES, Services

log = logging.getLogger(__name__)

PATH = "/auth/quota/webhook"
SIGNATURE_HEADER = "X-Quota-Signature"
MAX_BODY_BYTES = 64 * 1024  # Quota's events are a few hundred bytes
EVENT_TYPES = frozenset(
    {"user.connected", "user.disconnected", "balance.updated", "balance.low", "usage.completed"}
)
_MAX_ID_CHARS = 128
# How a refusal is counted in quota_sidecar_webhooks_received_total (anything else: failed).
_OUTCOMES: dict[type[SidecarError], str] = {
    PayloadTooLarge: "too_large",
    WebhookSignatureInvalid: "signature_invalid",
    BadRequest: "invalid",
    WebhookStale: "stale",
    WebhookReplayed: "replayed",
}


async def receive(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    secret = services.config.webhooks.secret
    if secret is None:
        raise WebhooksNotConfigured
    event_type: str | None = None
    try:
        body = await _read_capped(request)
        _verify(secret.reveal().encode(), request.headers.get(SIGNATURE_HEADER), body)
        envelope = _parse(body)
        event_type = envelope["type"]
        _check_fresh(envelope["created_at"], services)
        # Shielded: once the id is claimed, a Quota that hangs up must not cut the work in half
        # (its retry would then be refused as a replay).
        answer = await asyncio.shield(_handle(services, envelope))
    except SidecarError as exc:
        services.metrics.webhook_received(event_type, _OUTCOMES.get(type(exc), "failed"))
        raise
    return web.json_response(answer, headers=NO_STORE)


async def _read_capped(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise PayloadTooLarge(detail=f"webhook declared {request.content_length} bytes")
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise PayloadTooLarge(detail="webhook body over the cap")
    return bytes(body)


def _verify(secret: bytes, header: str | None, body: bytes) -> None:
    if header is None:
        raise WebhookSignatureInvalid(detail=f"no {SIGNATURE_HEADER} header")
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
    given = header.strip().lower().encode("utf-8", "replace")
    if not hmac.compare_digest(given, expected):
        raise WebhookSignatureInvalid(detail="signature does not match the body")


def _parse(body: bytes) -> dict[str, Any]:
    try:
        envelope = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("The webhook body is not JSON.") from None
    if not isinstance(envelope, dict):
        raise BadRequest("The webhook body is not a JSON object.")
    event_id, event_type = envelope.get("id"), envelope.get("type")
    created_at, data = envelope.get("created_at"), envelope.get("data")
    if (
        not isinstance(event_id, str)
        or not event_id.startswith("evt_")
        or len(event_id) > _MAX_ID_CHARS
        or not isinstance(event_type, str)
        or len(event_type) > _MAX_ID_CHARS
        or isinstance(created_at, bool)
        or not isinstance(created_at, int | float)
        or not isinstance(data, dict)
    ):
        raise BadRequest(
            'The webhook is not an event: it needs {"id": "evt_…", "type", "created_at", "data"}.'
        )
    return envelope


def _check_fresh(created_at: float, services: Services) -> None:
    age_s = services.clock() - created_at
    if age_s > services.config.webhooks.max_age_s:
        raise WebhookStale(detail=f"created {age_s:.0f} s ago")
    if -age_s > WEBHOOK_FUTURE_SKEW_S:
        raise WebhookStale(detail=f"created {-age_s:.0f} s in the future")


async def _handle(services: Services, envelope: dict[str, Any]) -> dict[str, Any]:
    event_id, event_type, data = envelope["id"], envelope["type"], envelope["data"]
    store = services.tokens.store
    if not await store.claim_event(event_id, services.config.webhooks.replay_window_s):
        raise WebhookReplayed(detail=event_id)
    answer: dict[str, Any] = {"received": True, "id": event_id, "type": event_type}
    user: str | None = None
    client_id = data.get("client_id")
    if event_type not in EVENT_TYPES or (
        client_id is not None and client_id != services.config.quota.client_id
    ):
        log.info("webhook %s (%s) ignored: not an event of this app", event_id, event_type)
        services.metrics.webhook_received(event_type, "ignored")
        return {**answer, "ignored": True}
    if event_type == "user.disconnected":
        quota_user_id = data.get("user_id")
        forgotten: list[str | None] = []
        if isinstance(quota_user_id, str) and quota_user_id:
            try:
                forgotten = await services.tokens.forget_quota_user(quota_user_id, reason="webhook")
            except StoreUnavailable:
                await _release(services, event_id)
                raise
        log.info(
            "webhook %s: Quota disconnected the user; %d grant(s) forgotten",
            event_id,
            len(forgotten),
        )
        answer["disconnected"] = len(forgotten)
        # The grants are gone, so the sink could no longer look the user up when it sends.
        user = forgotten[0] if len(forgotten) == 1 else None
    services.events.forward(envelope, user=user)
    services.metrics.webhook_received(event_type, "accepted")
    return answer


async def _release(services: Services, event_id: str) -> None:
    """Let Quota's retry of an event we could not finish be processed (best effort)."""
    try:
        await services.tokens.store.release_event(event_id)
    except StoreUnavailable:
        log.warning("webhook %s: could not release its claim; a retry will be refused", event_id)


def add_routes(app: web.Application) -> None:
    app.router.add_post(PATH, receive)
