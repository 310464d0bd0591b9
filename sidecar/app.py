"""Wiring: the public and internal ``web.Application``s, and the runner that serves them.

    public  (browser)   /auth/quota/* answered here; every other path proxied to the host app
    internal (backend)  /v1/*, /v1beta/* forwarded to Quota; /auth/quota/status|disconnect|balance

Both apps share one ``Services`` (clients, store, keys), made by ``sidecar.services``.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler

from sidecar import middleware
from sidecar.access_log import ACCESS_LOGGER, LISTENER, AccessLogger
from sidecar.config_loader import split_host_port
from sidecar.errors import InvalidApiKey, MethodNotAllowed, NotFound
from sidecar.forwarding import quota as quota_forward
from sidecar.forwarding import upstream
from sidecar.pending import PENDING_COOKIES, PendingCookies
from sidecar.routes import backend, browser
from sidecar.services import SERVICES, Services

log = logging.getLogger(__name__)


def handler_args(services: Services) -> dict[str, float | int]:
    """aiohttp's request-parser limits: a proxy must not buffer unbounded headers."""
    limits = services.config.limits
    return {
        "max_line_size": limits.max_header_size_bytes,
        "max_field_size": limits.max_header_size_bytes,
        "max_headers": limits.max_header_count,
        "keepalive_timeout": limits.keepalive_timeout_s,
    }


async def _unknown_auth_path(request: web.Request) -> web.StreamResponse:
    if request.path in browser.PATHS:
        raise MethodNotAllowed
    raise NotFound


def create_public_app(services: Services) -> web.Application:
    # Middleware order: request id first (every line logged carries it), then error rendering.
    app = web.Application(
        middlewares=[middleware.request_id, middleware.errors],
        handler_args=handler_args(services),
    )
    app[SERVICES] = services
    app[LISTENER] = "public"
    app[PENDING_COOKIES] = PendingCookies(
        services.cookie_key, services.config.session, services.trusted_proxies
    )
    app.on_response_prepare.append(middleware.add_request_id_header)
    browser.add_routes(app)
    app.router.add_route("*", "/auth/quota/{tail:.*}", _unknown_auth_path)
    upstream.add_routes(app)
    return app


def internal_key_guard(services: Services) -> Callable[..., object]:
    """With ``identity.internal_api_key`` set, every internal call must carry it.

    Accepted as ``Authorization: Bearer <key>`` (OpenAI SDKs' ``api_key``) or ``x-api-key``
    (Anthropic SDKs' ``api_key``); compared in constant time.
    """
    key = services.config.identity.internal_api_key
    expected = key.reveal().encode() if key is not None else None

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None:
            auth = request.headers.get("Authorization", "")
            given = (
                auth[7:] if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
            )
            if not hmac.compare_digest(given.encode(), expected):
                raise InvalidApiKey
        return await handler(request)

    return guard


def create_internal_app(services: Services) -> web.Application:
    app = web.Application(
        middlewares=[middleware.request_id, middleware.errors, internal_key_guard(services)],  # type: ignore[list-item]
        handler_args=handler_args(services),
    )
    app[SERVICES] = services
    app[LISTENER] = "internal"
    app.on_response_prepare.append(middleware.add_request_id_header)
    quota_forward.add_routes(app)
    backend.add_routes(app)
    return app


@dataclass
class Sidecar:
    """Serves both listeners until ``stop()``; ``urls`` names where they ended up."""

    services: Services
    runners: list[web.AppRunner] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)

    async def start(self) -> None:
        cfg = self.services.config.listen
        for name, app, address in (
            ("public", create_public_app(self.services), cfg.public),
            ("internal", create_internal_app(self.services), cfg.internal),
        ):
            runner = web.AppRunner(
                app,
                access_log_class=AccessLogger,
                access_log=ACCESS_LOGGER,
                handler_cancellation=True,  # a client that leaves cancels its upstream call
                shutdown_timeout=10,
            )
            await runner.setup()
            host, port = split_host_port(address)
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
            self.runners.append(runner)
            self.urls[name] = _bound_url(runner, host)
            log.info("%s listener on %s", name, self.urls[name])

    async def stop(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()
        self.runners.clear()


def _bound_url(runner: web.AppRunner, host: str) -> str:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            shown = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
            return f"http://{shown}:{addr[1]}"
    return f"http://{host}"
