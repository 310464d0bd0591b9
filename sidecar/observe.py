"""Where each request's time goes: route classes, timings, request metrics and client traces.

Added latency, measured: ``RequestWatch`` notes when a request's handler starts; the
``on_response_prepare`` hook notes when its response headers go out; and ``OutgoingCalls`` adds
up, for the request being handled, the time spent waiting for Quota or the host app to answer
(the identity probe, a token refresh, the forwarded call itself), as each call's connection saw
it: from the request's last byte written to the answer's headers read (``sidecar.wire_times``),
so that time the busy event loop spent on other requests around the call is the sidecar's. A
client trace tells it of every call through the Quota and host-app sessions; the forwarders tell
it themselves, around each call they send::

    added = (time to the response headers) - (time waiting for Quota or the app to answer)

A stream's body is not part of either term: how long Quota takes to send the rest is Quota's
time. A request that waits on a refresh another request started counts that wait as its own
(once per token expiry, at most). ``OutgoingCalls`` also stamps ``X-Request-Id`` on every
outgoing call (forwarded, proxied, OAuth, probe), so one id follows a request through every log.

Route classes, a bounded label: ``auth`` (/auth/quota/*), ``v1`` (/v1/*, /v1beta/* on the
internal listener), ``proxy`` (everything else on the public listener), ``admin``, ``other``.
"""

from __future__ import annotations

import contextvars
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar import log as sidecar_log
from sidecar import wire_times
from sidecar.instruments import Counter, GaugeChild, Histogram
from sidecar.metrics import Metrics, status_label

# nginx's convention for "the client closed the connection before the answer".
CLIENT_CLOSED = 499
V1_PREFIXES = ("/v1/", "/v1beta/")


def route_class(listener: str, path: str) -> str:
    if listener == "admin":
        return "admin"
    if path.startswith("/auth/quota/"):
        return "auth"
    if listener == "internal":
        return "v1" if path.startswith(V1_PREFIXES) else "other"
    return "proxy"


@dataclass(slots=True)
class Timing:
    """One request's clock: when it started, what it waited on, when its headers went out."""

    listener: str
    route: str
    started: float
    upstream_s: float = 0.0
    headers_s: float | None = None
    added_s: float | None = None
    handler_done: bool = False
    gauge: GaugeChild | None = None  # the open-streams or WebSocket gauge this request holds
    user_key: str | None = None

    def finish(self, children: ListenerMetrics, status: int) -> None:
        total = time.perf_counter() - self.started
        self.handler_done = True
        if self.gauge is not None:
            self.gauge.dec()
            self.gauge = None
        to_headers = self.headers_s if self.headers_s is not None else total
        self.added_s = max(0.0, to_headers - self.upstream_s)
        children.requests(self.route, status).inc()
        duration, added = children.durations(self.route)
        duration.observe(total)
        added.observe(self.added_s)


class ListenerMetrics:
    """One listener's request metrics, their label children bound once each.

    ``labels()`` takes a lock and builds a key on every call; the label sets here are small and
    fixed (route classes by status classes), so each child is looked up once and kept.
    """

    def __init__(self, metrics: Metrics, listener: str) -> None:
        self._metrics = metrics
        self._listener = listener
        self._requests: dict[tuple[str, int], Any] = {}
        self._durations: dict[str, tuple[Any, Any]] = {}

    def requests(self, route: str, status: int) -> Any:
        child = self._requests.get((route, status))
        if child is None:
            child = self._metrics.requests.labels(self._listener, route, status_label(status))
            self._requests[(route, status)] = child
        return child

    def durations(self, route: str) -> tuple[Any, Any]:
        pair = self._durations.get(route)
        if pair is None:
            pair = (
                self._metrics.request_duration.labels(self._listener, route),
                self._metrics.added_latency.labels(self._listener, route),
            )
            self._durations[route] = pair
        return pair


TIMING = web.RequestKey("timing", Timing)
# The request being handled, for the client traces (they run in the handler's task, or in a
# refresh task it started, which inherits this context).
_current: contextvars.ContextVar[Timing | None] = contextvars.ContextVar("timing", default=None)


def note_user(request: web.Request, user_key: str) -> None:
    """Name the user in the access log by the first 16 characters of their (hashed) key."""
    timing = request.get(TIMING)
    if timing is not None:
        timing.user_key = user_key[:16]


class RequestWatch:
    """Counts and times every request of one listener.

    Not a middleware of its own: the listener's one middleware (``sidecar.middleware``) calls
    ``start`` once the request id is set and ``finish`` with the status the client got.
    """

    __slots__ = ("_children", "_listener")

    def __init__(self, listener: str, metrics: Metrics) -> None:
        self._listener = listener
        self._children = ListenerMetrics(metrics, listener)

    def start(self, request: web.Request) -> tuple[Timing, contextvars.Token[Timing | None]]:
        timing = Timing(
            self._listener, route_class(self._listener, request.path), time.perf_counter()
        )
        request[TIMING] = timing
        return timing, _current.set(timing)

    def finish(self, timing: Timing, token: contextvars.Token[Timing | None], status: int) -> None:
        _current.reset(token)
        timing.finish(self._children, status)


def prepare_hook(
    metrics: Metrics,
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """``on_response_prepare``: note the time to headers; count a stream while it flows.

    A response prepared while its handler still runs is streamed (the handler writes its body
    after this point): it holds the open-streams gauge, or the WebSocket gauge, until the
    handler returns.
    """

    gauges: dict[tuple[bool, str, str], GaugeChild] = {}  # bound once per label set

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        timing = request.get(TIMING)
        if timing is None or timing.headers_s is not None:
            return
        timing.headers_s = time.perf_counter() - timing.started
        if not timing.handler_done:
            key = (isinstance(response, web.WebSocketResponse), timing.listener, timing.route)
            gauge = gauges.get(key)
            if gauge is None:
                family = metrics.websockets if key[0] else metrics.open_streams
                gauge = gauges[key] = family.labels(timing.listener, timing.route)
            timing.gauge = gauge
            gauge.inc()

    return on_prepare


# --- outgoing calls ------------------------------------------------------------------------


def quota_call(base_url: str) -> Callable[[URL], str]:
    """Which kind of Quota call a URL is: ``v1``, ``oauth``, ``discovery`` or ``other``."""
    base_path = URL(base_url).path.rstrip("/")

    def classify(url: URL) -> str:
        path = url.path
        if base_path and path.startswith(base_path):
            path = path[len(base_path) :]
        if path.startswith(V1_PREFIXES):
            return "v1"
        if path.startswith("/oauth/"):
            return "oauth"
        if path.startswith("/.well-known/"):
            return "discovery"
        return "other"

    return classify


def app_call(upstream_url: str, probe_path: str) -> Callable[[URL], str]:
    """Which kind of host-app call a URL is: the identity ``probe`` or a ``proxy``-ed request."""
    probe = URL(upstream_url.rstrip("/") + probe_path).path

    def classify(url: URL) -> str:
        return "probe" if url.path == probe else "proxy"

    return classify


class OutgoingCalls:
    """One outgoing session's accounting: request id stamped, time to answer, calls unanswered.

    The session's trace (``client_trace``) calls it for every call made through the session; the
    forwarders call it themselves around each call they send through their untraced twin of the
    session (``ObservedSession``), because aiohttp's trace signals cost more per forwarded call
    than everything done here.
    """

    def __init__(
        self, classify: Callable[[URL], str], duration: Histogram, errors: Counter
    ) -> None:
        self._classify = classify
        self._duration = duration
        self._errors = errors
        self._durations: dict[str, Any] = {}  # call class -> its histogram child, bound once

    def classify(self, url: URL) -> str:
        return self._classify(url)

    def stamp(self, headers: CIMultiDict[str]) -> None:
        rid = sidecar_log.request_id.get()
        if rid != "-":
            headers["X-Request-Id"] = rid

    def answered(self, call: str, started: float, response: aiohttp.ClientResponse) -> None:
        """The answer's headers are in: the wait counts for the request being handled."""
        child = self._durations.get(call)
        if child is None:
            child = self._durations[call] = self._duration.labels(call)
        child.observe(_charge(wire_times.waited(response, started, time.perf_counter())))

    def failed(self, call: str, started: float, exc: BaseException) -> None:
        _charge(time.perf_counter() - started)
        if isinstance(exc, TimeoutError):
            self._errors.labels(call, "timeout").inc()
        elif isinstance(exc, aiohttp.ClientError | OSError):
            self._errors.labels(call, "unreachable").inc()
        # Anything else (a cancelled call, a body refused as too large) is not the remote's fault.


def _charge(waited: float) -> float:
    """Count ``waited`` as time the request being handled spent waiting for a remote."""
    timing = _current.get()
    if timing is not None:
        timing.upstream_s += waited
    return waited


@dataclass(frozen=True, slots=True)
class ObservedSession:
    """A session whose calls are accounted by the caller (``calls``), with no trace of its own.

    It shares its connection pool with the traced session for the same target, so the
    forwarders and the other calls to that target still draw on one ``limits.pool_size``.
    """

    http: aiohttp.ClientSession
    calls: OutgoingCalls


def client_trace(calls: OutgoingCalls) -> aiohttp.TraceConfig:
    """A trace for one outgoing session: ``calls`` told of every call made through it."""
    trace = aiohttp.TraceConfig()

    async def on_start(
        session: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceRequestStartParams,
    ) -> None:
        calls.stamp(params.headers)
        ctx.call = calls.classify(params.url)
        ctx.started = time.perf_counter()

    async def on_end(
        session: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceRequestEndParams,
    ) -> None:
        calls.answered(ctx.call, ctx.started, params.response)

    async def on_exception(
        session: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceRequestExceptionParams,
    ) -> None:
        calls.failed(ctx.call, ctx.started, params.exception)

    trace.on_request_start.append(on_start)
    trace.on_request_end.append(on_end)
    trace.on_request_exception.append(on_exception)
    return trace


# --- Quota's error codes on /v1 -------------------------------------------------------------

# Error bodies are small; anything larger is not parsed (and never a 2xx body).
ERROR_BODY_MAX_BYTES = 16 * 1024


class QuotaErrorTap:
    """Keeps a copy of a small JSON error body as it streams to the client, to count its code.

    Only for non-2xx answers; the body still goes to the client untouched, chunk by chunk.
    """

    def __init__(self, metrics: Metrics, status: int) -> None:
        self._metrics = metrics
        self._status = status
        self._chunks: list[bytes] = []
        self._size = 0

    @classmethod
    def of(cls, metrics: Metrics, upstream: aiohttp.ClientResponse) -> QuotaErrorTap | None:
        """A tap when the answer is an error; ``None`` (nothing to do) for a 1xx-3xx answer.

        An error that cannot be parsed cheaply (not JSON, compressed, or large) is counted at
        once as ``http_<status>``.
        """
        status = upstream.status
        if status < 400:
            return None
        length = upstream.headers.get("Content-Length")
        if (
            "json" not in upstream.headers.get("Content-Type", "")
            or upstream.headers.get("Content-Encoding", "identity") != "identity"
            or (length is not None and (not length.isdigit() or int(length) > ERROR_BODY_MAX_BYTES))
        ):
            metrics.quota_failed("v1", f"http_{status}")
            return None
        return cls(metrics, status)

    def __call__(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= ERROR_BODY_MAX_BYTES:
            self._chunks.append(chunk)
        else:
            self._chunks.clear()

    def record(self) -> None:
        code = None
        if self._size <= ERROR_BODY_MAX_BYTES:
            code = error_code(b"".join(self._chunks))
        self._metrics.quota_failed("v1", code or f"http_{self._status}")


def error_code(body: bytes) -> str | None:
    """``code`` from Quota's ``{"error": {"code": …}}`` (or RFC 6749's ``{"error": "…"}``)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        err = err.get("code")
    return err if isinstance(err, str) else None
