"""The sidecar's Prometheus metrics: one registry per ``Services``, bounded label sets only.

Every instrument lives on a ``Metrics`` object made in ``open_services`` and passed to whoever
records (the token manager, the refresh lock, the request middleware, the client traces), so
many sidecars can run in one process — as the tests do — without sharing a global registry.

No label ever carries a user id, a URL or a token. Labels taken from outside (Quota's error
codes, the ``error`` a browser brings back to the callback) go through ``BoundedLabel``: codes
in a known set pass, a few more well-formed ones are admitted, and everything past that is
counted as ``other``.

Names (all prefixed ``quota_sidecar_``), and what they answer:

    requests_total{listener,route,status}        what the listeners answered
    request_duration_seconds{listener,route}     whole handler time (streams included)
    added_latency_seconds{listener,route}        the sidecar's own time before the response
                                                 started, upstream waits subtracted (observe.py)
    quota_request_duration_seconds{call}         Quota's time to answer (to its headers)
    quota_errors_total{call,code}                Quota's error codes on /v1, and transport errors
    app_request_duration_seconds{call}           the host app's time to answer (probe, proxy)
    app_errors_total{call,code}                  transport errors towards the host app
    open_streams{listener,route}                 responses whose body is still flowing
    websocket_connections{listener,route}        WebSockets being relayed
    refreshes_total{outcome}                     token refreshes and how they ended
    refresh_lock_wait_seconds{outcome}           waits for another replica's refresh lease
    store_errors_total{operation}                token store calls that failed
    connects_started_total / _completed_total / _failed_total{quota_error}
    wallets_connected_total / wallets_disconnected_total{reason}
    event_deliveries_total{outcome}              host-app events: ok, retry, failed, dropped
    event_queue_depth                            host-app events waiting to be sent
    topups_started_total                         browsers sent to Quota's checkout
    usage_credits_total{endpoint}                credits Quota reported spending (its quota blocks)
    usage_tokens_total{endpoint,kind}            tokens the model counted: prompt, completion
    usage_billed_requests_total{endpoint}        billed calls Quota answered 200
    usage_unread_total{endpoint,reason}          billed calls whose usage could not be read
    guard_rejections_total{code}                 calls refused by a per-user guard (429)
    guard_errors_total{operation}                guard checks that failed and let the call through
    webhooks_received_total{type,outcome}        Quota webhooks, by event type and what was done
    build_info{version}
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from sidecar import __version__

# The instruments: prometheus_client's exposition, updated without a lock (sidecar.instruments).
from sidecar.instruments import Counter, CounterChild, Gauge, Histogram, Instrument

PREFIX = "quota_sidecar"

# Whole requests: from a millisecond to a long stream.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# The sidecar's own share: well under a millisecond when all is well.
ADDED_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
# A remote party's time to answer (model calls answer headers after the first token).
REMOTE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LOCK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REFRESH_OUTCOMES = (
    "ok",  # Quota issued new tokens and they were stored
    "invalid_grant",  # Quota ended the grant (invalid_grant and kin): the user must reconnect
    "transient",  # Quota unavailable, 5xx or 429: the record was kept
    "grace_hit",  # the token had just been rotated elsewhere: its successor was used
    "already_fresh",  # another request or replica refreshed first: no call to Quota
    "discarded",  # refreshed, but the record changed meanwhile (disconnect won): revoked
)
DISCONNECT_REASONS = ("user", "grant_ended", "webhook")
# Quota's webhook event types (anything else is "other"), and what the receiver did with one.
WEBHOOK_TYPES = (
    "user.connected", "user.disconnected", "balance.updated", "balance.low", "usage.completed",
)  # fmt: skip
WEBHOOK_OUTCOMES = (
    "accepted",  # verified, handled, forwarded to the host app
    "ignored",  # verified, but for another OAuth client or of a type the sidecar does not know
    "signature_invalid",  # X-Quota-Signature missing or wrong
    "stale",  # created_at too old or in the future
    "replayed",  # an event id already received
    "too_large",  # body over the cap
    "invalid",  # signed, but not an event envelope
    "failed",  # the store could not be reached; Quota retries
)
# Billed endpoints (sidecar.guards.metered.endpoint_of), token kinds, guard refusals: fixed sets.
USAGE_ENDPOINTS = (
    "chat", "messages", "responses", "completions", "embeddings", "audio", "images", "gemini",
    "other",
)  # fmt: skip
TOKEN_KINDS = ("prompt", "completion")
GUARD_CODES = ("too_many_streams", "spend_limit_reached")
EVENT_OUTCOMES = (
    "ok",  # the host app answered 2xx
    "retry",  # an attempt failed (non-2xx, timeout, no connection) and another is scheduled
    "failed",  # every attempt failed: the event is given up
    "dropped",  # never sent: the queue was full, or the sidecar stopped with it still queued
)

# OAuth (RFC 6749 §4.1.2.1, §5.2) and the sidecar's own callback failures.
CONNECT_ERRORS = frozenset(
    {
        "access_denied",
        "invalid_request",
        "invalid_scope",
        "server_error",
        "temporarily_unavailable",
        "unauthorized_client",
        "unsupported_response_type",
        "invalid_callback",
        "state_mismatch",
        "identity_changed",
        "token_exchange_failed",
        "store_unavailable",
        "upstream_unavailable",
        "quota_unavailable",
    }
)
# Quota's documented error codes on its API.
QUOTA_ERRORS = frozenset(
    {
        "insufficient_credits",
        "insufficient_scope",
        "invalid_token",
        "invalid_request",
        "invalid_request_error",
        "model_not_found",
        "not_found",
        "rate_limited",
        "rate_limit_exceeded",
        "server_error",
        "unauthorized",
        "unreachable",
        "timeout",
    }
)

_CODE = re.compile(r"^[a-z0-9_]{1,48}$")
_HTTP_CODE = re.compile(r"^http_[1-5][0-9][0-9]$")  # bounded by HTTP itself


class BoundedLabel:
    """Turns a code from outside into a label value, keeping the set of values small.

    Known codes always pass; up to ``extra`` other well-formed codes are admitted as they are
    first seen (an error code new to this table stays visible); the rest become ``other``.
    """

    def __init__(self, known: Iterable[str], *, extra: int = 16) -> None:
        self._known = frozenset(known)
        self._extra = extra
        self._admitted: set[str] = set()

    def __call__(self, code: str | None) -> str:
        if code is None or not _CODE.match(code):
            return "other"
        if code in self._known or code in self._admitted or _HTTP_CODE.match(code):
            return code
        if len(self._admitted) < self._extra:
            self._admitted.add(code)
            return code
        return "other"


def status_label(status: int) -> str:
    """The status code as a label: HTTP's range is small; anything else is ``other``."""
    return str(status) if 100 <= status <= 599 else "other"


class Metrics:
    """Every instrument of one sidecar, on its own ``CollectorRegistry``.

    ``exposition`` is what ``/metrics`` renders: the same registry, or under ``--workers`` one
    that sums every worker's files (``sidecar.worker_metrics``). Gauges say how they sum.
    """

    def __init__(
        self, *, process: bool = True, exposition: CollectorRegistry | None = None
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.exposition = exposition or self.registry
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.build_info = Gauge(
            f"{PREFIX}_build_info",
            "The running version (always 1).",
            ["version"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__).set(1)

        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests answered, by listener, route class and status code.",
            ["listener", "route", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Whole handler time, streamed bodies included.",
            ["listener", "route"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.added_latency = Histogram(
            f"{PREFIX}_added_latency_seconds",
            "Time the sidecar itself added before the response started: time to the response "
            "headers minus the time spent waiting for Quota or the host app to answer.",
            ["listener", "route"],
            buckets=ADDED_BUCKETS,
            registry=r,
        )
        self.quota_duration = Histogram(
            f"{PREFIX}_quota_request_duration_seconds",
            "Quota's time to answer a call (request sent to answer's headers read), by call kind.",
            ["call"],
            buckets=REMOTE_BUCKETS,
            registry=r,
        )
        self.quota_errors = Counter(
            f"{PREFIX}_quota_errors",
            "Quota's error answers on /v1 by its error code (http_<status> when it gave none), "
            "and calls that got no answer (unreachable, timeout).",
            ["call", "code"],
            registry=r,
        )
        self.app_duration = Histogram(
            f"{PREFIX}_app_request_duration_seconds",
            "The host app's time to answer (request sent to answer's headers read): probe or proxy.",
            ["call"],
            buckets=REMOTE_BUCKETS,
            registry=r,
        )
        self.app_errors = Counter(
            f"{PREFIX}_app_errors",
            "Calls to the host app that got no answer (unreachable, timeout).",
            ["call", "code"],
            registry=r,
        )
        self.open_streams = Gauge(
            f"{PREFIX}_open_streams",
            "Responses whose headers went out and whose body is still flowing (SSE, downloads).",
            ["listener", "route"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.websockets = Gauge(
            f"{PREFIX}_websocket_connections",
            "WebSocket connections being relayed.",
            ["listener", "route"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.refreshes = Counter(
            f"{PREFIX}_refreshes",
            "Token refreshes by outcome: " + ", ".join(REFRESH_OUTCOMES) + ".",
            ["outcome"],
            registry=r,
        )
        self.lock_wait = Histogram(
            f"{PREFIX}_refresh_lock_wait_seconds",
            "Waits for another replica's refresh lease (count and duration), by outcome.",
            ["outcome"],
            buckets=LOCK_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            f"{PREFIX}_store_errors",
            "Token store calls that failed (store unreachable), by operation.",
            ["operation"],
            registry=r,
        )
        self.connects_started = Counter(
            f"{PREFIX}_connects_started",
            "Wallet connects started (a signed-in user sent to Quota's consent page).",
            registry=r,
        )
        self.connects_completed = Counter(
            f"{PREFIX}_connects_completed",
            "Wallet connects that came back and stored tokens.",
            registry=r,
        )
        self.connects_failed = Counter(
            f"{PREFIX}_connects_failed",
            "Wallet connects that came back and failed, by the quota_error sent to the app.",
            ["quota_error"],
            registry=r,
        )
        self.wallets_connected = Counter(
            f"{PREFIX}_wallets_connected",
            "Grants stored (a connect, or a reconnect replacing a grant).",
            registry=r,
        )
        self.wallets_disconnected = Counter(
            f"{PREFIX}_wallets_disconnected",
            "Grants forgotten: by the user (disconnect), because Quota ended them on refresh "
            "(grant_ended), or because Quota's user.disconnected webhook said so (webhook).",
            ["reason"],
            registry=r,
        )
        self.webhooks_received = Counter(
            f"{PREFIX}_webhooks_received",
            "Quota webhooks received, by event type and outcome: "
            + ", ".join(WEBHOOK_OUTCOMES)
            + ".",
            ["type", "outcome"],
            registry=r,
        )
        self.event_deliveries = Counter(
            f"{PREFIX}_event_deliveries",
            "Host-app event deliveries by outcome: " + ", ".join(EVENT_OUTCOMES) + ".",
            ["outcome"],
            registry=r,
        )
        self.event_queue_depth = Gauge(
            f"{PREFIX}_event_queue_depth",
            "Host-app events waiting to be sent (events.queue_size at most, per worker).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.topups_started = Counter(
            f"{PREFIX}_topups_started",
            "Top-ups started: a signed-in user sent to Quota's checkout page.",
            registry=r,
        )
        for outcome in EVENT_OUTCOMES:
            self.event_deliveries.labels(outcome)
        # Usage read from Quota's answers, and the per-user guards (sidecar.forwarding.usage,
        # sidecar.guards). Labels: the billed endpoint (USAGE_ENDPOINTS), never a user.
        self.usage_credits = Counter(
            f"{PREFIX}_usage_credits",
            "Credits Quota reported spending on billed calls (credits_used of its quota blocks).",
            ["endpoint"],
            registry=r,
        )
        self.usage_tokens = Counter(
            f"{PREFIX}_usage_tokens",
            "Tokens the model counted on billed calls whose usage was read, by kind: "
            + ", ".join(TOKEN_KINDS)
            + ".",
            ["endpoint", "kind"],
            registry=r,
        )
        self.usage_billed = Counter(
            f"{PREFIX}_usage_billed_requests",
            "Billed calls (POST /v1) Quota answered with 200, whether or not their usage was read.",
            ["endpoint"],
            registry=r,
        )
        self.usage_unread = Counter(
            f"{PREFIX}_usage_unread",
            "Billed calls answered 200 whose usage could not be read, by reason.",
            ["endpoint", "reason"],
            registry=r,
        )
        self.guard_rejections = Counter(
            f"{PREFIX}_guard_rejections",
            "Calls refused with 429 by a per-user guard, by error code.",
            ["code"],
            registry=r,
        )
        self.guard_errors = Counter(
            f"{PREFIX}_guard_errors",
            "Guard operations that failed (store unreachable); the call went through (fail open).",
            ["operation"],
            registry=r,
        )
        for endpoint in USAGE_ENDPOINTS:
            self.usage_credits.labels(endpoint)
            self.usage_billed.labels(endpoint)
        for code in GUARD_CODES:
            self.guard_rejections.labels(code)
        self._usage_children: dict[
            str, tuple[CounterChild, CounterChild, CounterChild, CounterChild]
        ] = {}
        self._unread_children: dict[tuple[str, str], tuple[CounterChild, CounterChild]] = {}
        # Zero series for the fixed label sets, so rates and alerts exist before the first event.
        for outcome in REFRESH_OUTCOMES:
            self.refreshes.labels(outcome)
        for reason in DISCONNECT_REASONS:
            self.wallets_disconnected.labels(reason)
        self.connect_error = BoundedLabel(CONNECT_ERRORS)
        self.quota_error = BoundedLabel(QUOTA_ERRORS)

    def instruments(self) -> list[Instrument[Any]]:
        """Every instrument of this sidecar (what ``--workers`` copies to its files)."""
        return [value for value in vars(self).values() if isinstance(value, Instrument)]

    def refreshed(self, outcome: str) -> None:
        self.refreshes.labels(outcome).inc()

    def store_failed(self, operation: str) -> None:
        self.store_errors.labels(operation).inc()

    def connect_failed(self, quota_error: str) -> None:
        self.connects_failed.labels(self.connect_error(quota_error)).inc()

    def quota_failed(self, call: str, code: str | None) -> None:
        self.quota_errors.labels(call, self.quota_error(code)).inc()

    def webhook_received(self, event_type: str | None, outcome: str) -> None:
        known = event_type if event_type in WEBHOOK_TYPES else "other"
        self.webhooks_received.labels(known, outcome).inc()

    # --- usage and guards ---

    def usage_read(
        self, endpoint: str, credits_used: int, prompt: int | None, completion: int | None
    ) -> None:
        children = self._usage_children.get(endpoint)
        if children is None:  # once per endpoint: ``labels()`` costs a lock and a lookup
            children = self._usage_children[endpoint] = (
                self.usage_billed.labels(endpoint),
                self.usage_credits.labels(endpoint),
                self.usage_tokens.labels(endpoint, "prompt"),
                self.usage_tokens.labels(endpoint, "completion"),
            )
        billed, credits, prompt_tokens, completion_tokens = children
        billed.inc()
        credits.inc(credits_used)
        if prompt:
            prompt_tokens.inc(prompt)
        if completion:
            completion_tokens.inc(completion)

    def usage_not_read(self, endpoint: str, reason: str) -> None:
        key = (endpoint, reason)
        children = self._unread_children.get(key)
        if children is None:  # bounded: endpoints x reasons, both fixed sets
            children = self._unread_children[key] = (
                self.usage_billed.labels(endpoint),
                self.usage_unread.labels(endpoint, reason),
            )
        for child in children:
            child.inc()

    def guard_rejected(self, code: str) -> None:
        self.guard_rejections.labels(code).inc()

    def guard_failed(self, operation: str) -> None:
        self.guard_errors.labels(operation).inc()
