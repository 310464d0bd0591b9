"""Forward the host app's ``/v1/*`` and ``/v1beta/*`` calls to Quota with the user's token.

The outgoing URL is the configured base plus the request's own path, appended as text and never
resolved with ``URL.join``: a path such as ``//evil.example/x`` would otherwise switch the host
and hand the user's bearer token to someone else. Paths with ``..``/``.`` segments, empty
segments, backslashes or encoded slashes are refused before anything is sent.
"""

from __future__ import annotations

import functools
import re
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar import scopes
from sidecar.errors import InvalidPath, QuotaUnavailable
from sidecar.forwarding.headers import FORWARDED, filter_headers
from sidecar.forwarding.stream import replayable_body, send, stream_back, stream_timeout
from sidecar.forwarding.websocket import is_upgrade, relay_websocket
from sidecar.guards.metered import metered, watch_usage
from sidecar.identity import header_user_key
from sidecar.routes import topup
from sidecar.services import SERVICES, Services

PREFIXES = ("/v1/", "/v1beta/")
# Headers from the host app that never reach Quota: credentials are ours to set. SDKs put
# their api_key in these (OpenAI: Authorization, Anthropic: x-api-key, Gemini: x-goog-api-key),
# and Quota bills whatever credential it is shown.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "api-key")
_DROP = (*CREDENTIAL_HEADERS, "cookie", "host", "content-length", *FORWARDED)
# What a path to Quota may not hold: an empty segment, a backslash, an encoded separator, or a
# control character, space or DEL.
_REFUSED = re.compile(r"//|\\|%(?:2f|5c)|[\x00-\x20\x7f]", re.IGNORECASE)


def quota_url(base_url: str, raw_path: str, raw_query: str) -> URL:
    """``base_url`` + ``raw_path`` (+ query), after refusing every path that could escape it."""
    if not raw_path.startswith(PREFIXES) or _REFUSED.search(raw_path):
        raise InvalidPath
    if ("." in raw_path or "%" in raw_path) and any(
        unquote(segment) in (".", "..") for segment in raw_path.split("/")
    ):
        raise InvalidPath
    base, origin = _base(base_url)
    url = URL(base + raw_path + (f"?{raw_query}" if raw_query else ""), encoded=True)
    if (url.scheme, url.host, url.port) != origin:
        raise InvalidPath  # defence in depth: never another host
    return url


@functools.lru_cache(maxsize=8)
def _base(base_url: str) -> tuple[str, tuple[str, str | None, int | None]]:
    """The base without its trailing slash, and its origin: parsed once, not per call."""
    base = URL(base_url)
    return base_url.rstrip("/"), (base.scheme, base.host, base.port)


def outgoing_headers(
    request: web.Request, services: Services, access_token: str
) -> CIMultiDict[str]:
    headers = filter_headers(request.headers, drop=(*_DROP, services.config.identity.header))
    headers["Authorization"] = f"Bearer {access_token}"
    length = request.headers.get("Content-Length")
    if length is not None and "Transfer-Encoding" not in request.headers:
        headers["Content-Length"] = length
    return headers


async def forward(request: web.Request) -> web.StreamResponse:
    """Forward one call; a 401 from Quota gets one forced refresh and one replay.

    The replay happens only when the whole body was buffered (``quota.replay_max_bytes``) and
    before any byte of the answer went to the client; otherwise Quota's 401 passes through.
    """
    services = request.app[SERVICES]
    user_key = header_user_key(request, services)
    url = quota_url(
        services.config.quota.base_url, request.rel_url.raw_path, request.rel_url.raw_query_string
    )
    record = await services.tokens.fresh(user_key)
    cfg = services.config.quota
    if is_upgrade(request):  # e.g. the realtime voice route
        headers = outgoing_headers(request, services, record.access_token)
        return await relay_websocket(
            request,
            services.quota_http,
            url,
            headers,
            connect_timeout_s=cfg.connect_timeout_s,
            unavailable=QuotaUnavailable,
        )
    limits = services.config.limits
    body, replayable = await replayable_body(
        request, cfg.replay_max_bytes, limits.max_v1_body_bytes, limits.body_idle_timeout_s
    )
    timeout = stream_timeout(
        cfg.connect_timeout_s, cfg.stream_idle_timeout_s, cfg.first_byte_timeout_s
    )

    async def attempt(access_token: str) -> aiohttp.ClientResponse:
        return await send(
            request,
            services.quota_forward,
            url,
            outgoing_headers(request, services, access_token),
            data=body,
            timeout=timeout,
            unavailable=lambda detail: QuotaUnavailable(detail=detail),
        )

    upstream = await attempt(record.access_token)
    if upstream.status == 401 and replayable:
        upstream.release()
        record = await services.tokens.after_rejection(user_key, record)
        upstream = await attempt(record.access_token)
    tap = scopes.watch(services, user_key, record, request.path, upstream)  # 403: needs_reconnect
    # A 402 insufficient_credits gains X-Quota-Topup-Url (its small body is read first).
    response = await topup.answer_payment_required(request, services, upstream, on_chunk=tap)
    if response is None:
        # Guards and usage (sidecar.guards.metered): a 200 answer's chunks also feed, as they go
        # to the client, the observer that reads Quota's quota block; an error feeds ``tap``.
        meter = watch_usage(request, upstream)
        response = await stream_back(request, upstream, on_chunk=tap or meter)
    if tap is not None:
        tap.record()
    return response


def add_routes(app: web.Application) -> None:
    for prefix in PREFIXES:
        # metered: per-user guards before the call, usage and settlement after it.
        app.router.add_route("*", prefix + "{tail:.*}", metered(forward))
