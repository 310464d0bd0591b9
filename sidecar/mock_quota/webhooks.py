"""Sending Quota's webhooks: sign each event, POST it in the background, retry, record the result.

Each event is one JSON envelope, serialised once; those exact bytes are signed and sent:

    POST <webhook_url>
    Content-Type: application/json
    X-Quota-Signature: <hex HMAC-SHA256(webhook_secret, raw body)>

    {"id": "evt_<24 hex>", "type": "balance.low", "created_at": <unix s>, "data": {...}}

Delivery never delays the API answer that caused the event: ``send`` starts a task and returns.
A non-2xx answer or a connection error is retried up to ``MAX_RETRIES`` times, ``RETRY_BACKOFF_S``
apart and doubling (0.2 s, 0.4 s, 0.8 s); each attempt is bounded by ``DELIVERY_TIMEOUT``. The
URL and secret are read when the event happens, so changing the settings later does not
redirect deliveries already under way.

``WebhookSender`` belongs to one emulator app: ``webhook_sender`` (a ``cleanup_ctx``) makes it
with its own ``ClientSession`` and, when the app stops, cancels and awaits every delivery still
pending before closing the session.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from .state import MOCK_QUOTA_KEY, MockQuota

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Quota-Signature"
# Retries after the first attempt; a receiver down for about 1.4 s still gets the event.
MAX_RETRIES = 3
RETRY_BACKOFF_S = 0.2
# A receiver that hangs must not hold a delivery (or the emulator's shutdown) for long.
DELIVERY_TIMEOUT = aiohttp.ClientTimeout(total=5, connect=2)
# Like the request log: enough for a test or a demo session, bounded for a long-running one.
DELIVERY_LOG_SIZE = 200


def sign(secret: str, body: bytes) -> str:
    """The ``X-Quota-Signature`` of ``body``: hex HMAC-SHA256 keyed with the whole secret."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def new_event_id() -> str:
    return f"evt_{secrets.token_hex(12)}"


@dataclass
class WebhookDelivery:
    """One event sent to one URL; ``status`` is the last HTTP status, None after a network error."""

    id: str
    type: str
    url: str
    body: bytes
    signature: str
    status: int | None = None
    attempts: int = 0
    error: str | None = None
    done: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "type": self.type,
            "url": self.url,
            "status": self.status,
            "attempts": self.attempts,
            "error": self.error,
            "done": self.done,
            "body": json.loads(self.body),
        }


class WebhookSender:
    """Sends events for one emulator; not thread-safe, one event loop owns it."""

    def __init__(self, quota: MockQuota, session: aiohttp.ClientSession) -> None:
        self.quota = quota
        self._session = session
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.deliveries: collections.deque[WebhookDelivery] = collections.deque(
            maxlen=DELIVERY_LOG_SIZE
        )

    def emit(self, event_type: str, data: Mapping[str, object]) -> WebhookDelivery | None:
        """Send a new event of ``event_type`` now; None when there is nowhere to send it."""
        return self.send(
            {
                "id": new_event_id(),
                "type": event_type,
                "created_at": int(self.quota.clock()),
                "data": dict(data),
            }
        )

    def send(self, envelope: Mapping[str, object]) -> WebhookDelivery | None:
        """Sign and start delivering ``envelope`` as it is (a replayed id, a stale created_at)."""
        url = self.quota.settings.webhook_url
        if url is None or self._closed:
            self.quota.counters["webhooks.skipped"] += 1
            return None
        body = json.dumps(envelope, separators=(",", ":")).encode()
        delivery = WebhookDelivery(
            id=str(envelope.get("id")),
            type=str(envelope.get("type")),
            url=url,
            body=body,
            signature=sign(self.quota.settings.webhook_secret, body),
        )
        self.deliveries.append(delivery)
        self.quota.counters["webhooks.sent"] += 1
        task = asyncio.get_running_loop().create_task(self._deliver(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return delivery

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Stop sending: cancel every delivery under way and wait until each has ended."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _deliver(self, delivery: WebhookDelivery) -> None:
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: delivery.signature,
            "User-Agent": "Quota-Webhooks (local emulator)",
        }
        for attempt in range(MAX_RETRIES + 1):
            if attempt:
                await asyncio.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
            delivery.attempts += 1
            try:
                async with self._session.post(
                    delivery.url, data=delivery.body, headers=headers, allow_redirects=False
                ) as resp:
                    await resp.read()
                    delivery.status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                delivery.status = None
                delivery.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            if 200 <= delivery.status < 300:
                delivery.error = None
                delivery.done = True
                self.quota.counters["webhooks.delivered"] += 1
                return
            delivery.error = f"HTTP {delivery.status}"
        delivery.done = True
        self.quota.counters["webhooks.failed"] += 1
        log.warning(
            "mock Quota: webhook %s (%s) to %s failed after %d attempts: %s",
            delivery.id,
            delivery.type,
            delivery.url,
            delivery.attempts,
            delivery.error,
        )


WEBHOOKS_KEY: web.AppKey[WebhookSender] = web.AppKey("mock_quota_webhooks", WebhookSender)


async def webhook_sender(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: the app's sender and its session, closed after pending deliveries end."""
    session = aiohttp.ClientSession(timeout=DELIVERY_TIMEOUT)
    sender = WebhookSender(app[MOCK_QUOTA_KEY], session)
    app[WEBHOOKS_KEY] = sender
    try:
        yield
    finally:
        await sender.close()
        await session.close()
