"""Reverse-proxy every public path the sidecar does not answer itself to the host app.

Method, path, query and body go through as they are (bodies streamed both ways). On the way in
the sidecar removes hop-by-hop headers, every spelling of the identity header, its own cookie and
client-sent ``X-Forwarded-*`` (kept only from trusted proxies), then sets ``X-Forwarded-For``,
``-Proto`` and ``-Host``. The browser's ``Host`` is passed on, as most apps build links from it.
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar.errors import UpstreamUnavailable
from sidecar.forwarding.headers import FORWARDED, add_forwarded, filter_headers, strip_cookie
from sidecar.forwarding.stream import relay, request_body, stream_timeout
from sidecar.forwarding.websocket import is_upgrade, relay_websocket
from sidecar.services import SERVICES, Services


def upstream_headers(request: web.Request, services: Services) -> CIMultiDict[str]:
    cfg = services.config
    headers = filter_headers(
        request.headers, drop=(cfg.identity.header, "content-length", *FORWARDED)
    )
    cookies = [strip_cookie(v, cfg.session.cookie_name) for v in headers.popall("Cookie", [])]
    kept = "; ".join(c for c in cookies if c)
    if kept:
        headers["Cookie"] = kept
    length = request.headers.get("Content-Length")
    if length is not None and "Transfer-Encoding" not in request.headers:
        headers["Content-Length"] = length
    add_forwarded(headers, request, services.trusted_proxies)
    if cfg.upstream.host_header == "rewrite":
        headers["Host"] = URL(cfg.upstream.url).raw_authority
    return headers


async def proxy(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    cfg = services.config.upstream
    raw = request.rel_url.raw_path
    if not raw.startswith("/"):
        raw = "/" + raw
    query = request.rel_url.raw_query_string
    url = URL(cfg.url.rstrip("/") + raw + (f"?{query}" if query else ""), encoded=True)
    if is_upgrade(request):
        headers = upstream_headers(request, services)
        return await relay_websocket(
            request,
            services.upstream_http,
            url,
            headers,
            connect_timeout_s=cfg.connect_timeout_s,
            unavailable=UpstreamUnavailable,
        )
    timeout = stream_timeout(cfg.connect_timeout_s, cfg.idle_timeout_s, cfg.first_byte_timeout_s)
    return await relay(
        request,
        services.upstream_forward,
        url,
        upstream_headers(request, services),
        data=request_body(
            request,
            services.config.limits.max_body_bytes,
            services.config.limits.body_idle_timeout_s,
        ),
        timeout=timeout,
        unavailable=lambda detail: UpstreamUnavailable(detail=detail),
    )


def add_routes(app: web.Application) -> None:
    app.router.add_route("*", "/{tail:.*}", proxy)
