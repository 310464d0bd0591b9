"""Host-app events: signed POSTs to ``events.url``, queued in memory and retried in the background.

Two kinds of event reach the host app, in one envelope::

    {"id": "sce_<hex>", "type": "...", "created_at": <unix s>, "user": <host user id | null>,
     "data": {...}}

* the sidecar's own (``emit``), such as ``sidecar.usage``, named for the host user they concern;
* Quota's webhooks, once verified (``forward``): their type, time and data are kept, their id
  becomes a stable ``sce_`` id (the same Quota event always maps to the same id), and ``user``
  is the host user id when Quota's user id maps to exactly one connected user.

Each delivery carries ``X-Quota-Sidecar-Signature: t=<unix s>,v1=<hex HMAC-SHA256(secret,
"<t>.<raw body>")>``, ``X-Quota-Sidecar-Event: <type>`` and ``X-Quota-Sidecar-Event-Id: <id>``;
``verify_signature`` checks one (docs/EVENTS.md has the scheme for other languages).

Neither call blocks nor raises: an event goes into a bounded queue, or, when the queue is full,
is dropped and counted. A few workers send it, retrying a non-2xx answer, a timeout or a refused
connection with exponential backoff; each attempt is signed afresh, so a retry passes a
receiver's freshness check. Events may arrive out of order, and — when an answer is lost after
the app acted on it — more than once: receivers dedupe on ``id``.

Shutdown (``close``): new events are dropped, queued ones get ``events.flush_timeout_s`` to go
out, then whatever is left is dropped, counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from sidecar.config import EventsConfig
from sidecar.errors import SidecarError
from sidecar.metrics import Metrics
from sidecar.tokens.store import TokenStore

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Quota-Sidecar-Signature"
EVENT_HEADER = "X-Quota-Sidecar-Event"
EVENT_ID_HEADER = "X-Quota-Sidecar-Event-Id"
# How far a signature's timestamp may be from the receiver's clock (either way).
DEFAULT_TOLERANCE_S = 300.0
# Deliveries in flight at once; a slow or failing app holds at most this many workers.
WORKERS = 4

# Maps a Quota user id to the host app's user id, or None when it is not exactly one user.
UserResolver = Callable[[str], Awaitable[str | None]]


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(
    secret: str,
    header: str | None,
    body: bytes,
    *,
    now: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> bool:
    """True when ``header`` is a valid signature of the raw ``body`` made within the tolerance.

    ``header`` is the ``X-Quota-Sidecar-Signature`` value; several ``v1=`` entries are allowed
    (any one matching is enough). Compare against the bytes as received, before parsing them.
    """
    if not header or not secret:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if key == "t":
            if timestamp is not None or not value.isdigit() or len(value) > 12:
                return False
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates or abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).rpartition("v1=")[2].encode()
    # Every candidate is compared (no early exit) so timing says nothing about which matched.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(candidate.encode(), expected)
    return matched


def forwarded_id(quota_event_id: str) -> str:
    """A stable ``sce_`` id for a Quota event: redeliveries of it carry the same id."""
    return "sce_" + hashlib.sha256(b"quota-event:" + quota_event_id.encode()).hexdigest()[:24]


class EventSink:
    """Where events go. This base sends nothing: it is the sink when ``events.url`` is unset."""

    enabled = False

    def emit(self, event_type: str, data: Mapping[str, Any], *, user: str | None = None) -> None:
        """Queue one of the sidecar's own events for ``user`` (the host app's user id)."""

    def forward(self, envelope: Mapping[str, Any], *, user: str | None = None) -> None:
        """Queue a verified Quota webhook envelope ``{id, type, created_at, data}``.

        ``user`` names the host user when the caller already knows it (e.g. resolved before a
        ``user.disconnected`` forgot the grants); otherwise it is looked up when sent.
        """

    async def start(self) -> None:
        """Start delivering."""

    async def close(self) -> None:
        """Deliver what is queued within the bound, then stop."""


@dataclass(slots=True)
class _Queued:
    envelope: dict[str, Any]
    quota_user_id: str | None = None  # forwarded events: resolved to ``user`` when sent


class HttpEventSink(EventSink):
    """Delivers events to ``events.url`` from a bounded queue (see the module docstring)."""

    enabled = True

    def __init__(
        self,
        config: EventsConfig,
        *,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        resolve_user: UserResolver | None = None,
    ) -> None:
        if config.url is None or config.secret is None:
            raise ValueError("an HttpEventSink needs events.url and events.secret")
        self._config = config
        self._url = config.url
        self._secret = config.secret
        self._metrics = metrics
        self._clock = clock
        self._resolve_user = resolve_user
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue(maxsize=config.queue_size)
        self._workers: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None
        self._busy = 0
        self._closing = False
        self._full_logged = False

    # --- producers: never block, never raise ------------------------------------------------

    def emit(self, event_type: str, data: Mapping[str, Any], *, user: str | None = None) -> None:
        envelope = {
            "id": "sce_" + secrets.token_hex(12),
            "type": event_type,
            "created_at": int(self._clock()),
            "user": user,
            "data": dict(data),
        }
        self._put(_Queued(envelope))

    def forward(self, envelope: Mapping[str, Any], *, user: str | None = None) -> None:
        event_id, event_type, data = envelope.get("id"), envelope.get("type"), envelope.get("data")
        if not isinstance(event_id, str) or not isinstance(event_type, str):
            log.warning("a Quota event without an id or a type was not forwarded")
            return
        data = dict(data) if isinstance(data, Mapping) else {}
        created_at = envelope.get("created_at")
        if isinstance(created_at, bool) or not isinstance(created_at, int):
            created_at = int(self._clock())
        quota_user = data.get("user_id")
        ours = {
            "id": forwarded_id(event_id),
            "type": event_type,
            "created_at": created_at,
            "user": user,
            "data": data,
        }
        lookup = quota_user if user is None and isinstance(quota_user, str) else None
        self._put(_Queued(ours, lookup))

    def _put(self, item: _Queued) -> None:
        if self._closing:
            self._dropped(1, "the sidecar is stopping")
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._dropped(1, f"the queue is full ({self._config.queue_size})")
            return
        self._full_logged = False
        self._metrics.event_queue_depth.set(self._queue.qsize())

    def _dropped(self, count: int, why: str) -> None:
        self._metrics.event_deliveries.labels("dropped").inc(count)
        if not self._full_logged:  # once per episode, not once per event
            self._full_logged = True
            log.warning("host-app events dropped: %s", why)

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._workers:
            return
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=WORKERS),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=self._config.timeout_s),
        )
        self._workers = [asyncio.create_task(self._work()) for _ in range(WORKERS)]
        log.info("host-app events go to %s", self._url)

    async def close(self) -> None:
        """Stop taking events; give the queued ones ``flush_timeout_s``; drop and count the rest.

        Timeline: close() ─ new events dropped ─ queue drains (or the bound passes) ─ workers
        cancelled, events still queued or mid-delivery counted as dropped ─ client closed.
        """
        if self._closing:
            return
        self._closing = True
        if self._workers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout=self._config.flush_timeout_s)
        left = self._queue.qsize() + self._busy
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        if left:
            self._metrics.event_deliveries.labels("dropped").inc(left)
            log.warning(
                "%d host-app event(s) not delivered at shutdown (events.flush_timeout_s=%g)",
                left,
                self._config.flush_timeout_s,
            )
        if self._http is not None:
            await self._http.close()
            self._http = None

    # --- delivery ---------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            item = await self._queue.get()
            self._busy += 1
            self._metrics.event_queue_depth.set(self._queue.qsize())
            try:
                await self._deliver(item)
            except asyncio.CancelledError:
                raise
            except Exception:  # a worker must outlive any one event
                log.exception("host-app event %s could not be sent", item.envelope.get("id"))
                self._metrics.event_deliveries.labels("failed").inc()
            finally:
                self._busy -= 1
                self._queue.task_done()

    async def _deliver(self, item: _Queued) -> None:
        envelope = item.envelope
        if item.quota_user_id is not None and self._resolve_user is not None:
            try:
                envelope["user"] = await self._resolve_user(item.quota_user_id)
            except SidecarError as exc:  # the store is down: send it without a user
                log.warning("event %s sent without its user: %s", envelope["id"], exc.code)
        body = json.dumps(envelope, separators=(",", ":")).encode()
        cfg = self._config
        for attempt in range(1, cfg.max_attempts + 1):
            why = await self._attempt(body, envelope["type"], envelope["id"])
            if why is None:
                self._metrics.event_deliveries.labels("ok").inc()
                return
            if attempt == cfg.max_attempts:
                self._metrics.event_deliveries.labels("failed").inc()
                log.warning(
                    "host-app event %s (%s) given up after %d attempt(s): %s",
                    envelope["id"],
                    envelope["type"],
                    attempt,
                    why,
                )
                return
            self._metrics.event_deliveries.labels("retry").inc()
            delay = min(cfg.backoff_base_s * 2 ** (attempt - 1), cfg.backoff_max_s)
            log.info("host-app event %s: %s; retry in %g s", envelope["id"], why, delay)
            await asyncio.sleep(delay)

    async def _attempt(self, body: bytes, event_type: str, event_id: str) -> str | None:
        """One signed POST; ``None`` on a 2xx answer, else why it failed."""
        assert self._http is not None
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self._secret.reveal(), int(self._clock()), body),
            EVENT_HEADER: event_type,
            EVENT_ID_HEADER: event_id,
        }
        try:
            async with self._http.post(
                self._url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                if 200 <= resp.status < 300:
                    return None
                return f"the app answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"no answer ({type(exc).__name__})"


def user_resolver(store: TokenStore) -> UserResolver:
    """Quota user id → the host app's user id, when exactly one stored grant carries it."""

    async def resolve(quota_user_id: str) -> str | None:
        keys = await store.user_keys_for_quota_user(quota_user_id)
        if len(keys) != 1:
            return None
        record = await store.get(keys[0])
        return record.user_id if record is not None else None

    return resolve


def create_sink(
    config: EventsConfig,
    *,
    metrics: Metrics,
    clock: Callable[[], float] = time.time,
    resolve_user: UserResolver | None = None,
) -> EventSink:
    """The configured sink: deliveries to ``events.url``, or the silent one when it is unset."""
    if config.url is None or config.secret is None:
        return EventSink()
    return HttpEventSink(config, metrics=metrics, clock=clock, resolve_user=resolve_user)
