"""Wiring: the public, internal and admin ``web.Application``s, and the runner that serves them.

    public  (browser)   /auth/quota/* answered here; every other path proxied to the host app
    internal (backend)  /v1/*, /v1beta/* forwarded to Quota; /auth/quota/status|disconnect|balance,
                        /auth/quota/users/{id}, /auth/quota/connect-url
    admin   (ops)       /healthz, /readyz, /metrics (``sidecar.admin``); optional

All share one ``Services`` (clients, store, keys, metrics), made by ``sidecar.services``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass, field

from aiohttp import web

from sidecar import middleware, observe
from sidecar.access_log import ACCESS_LOGGER, LISTENER, AccessLogger
from sidecar.admin import Health, create_admin_app
from sidecar.config_loader import split_host_port
from sidecar.errors import InvalidApiKey, MethodNotAllowed, NotFound
from sidecar.forwarding import quota as quota_forward
from sidecar.forwarding import upstream
from sidecar.pending import PENDING_COOKIES, PendingCookies
from sidecar.protocol import GuardedAppRunner
from sidecar.routes import backend, browser, topup, users, webhook, widget
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
    if request.path in browser.PATHS or request.path in topup.PATHS or request.path == webhook.PATH:
        raise MethodNotAllowed
    raise NotFound


def create_public_app(services: Services) -> web.Application:
    # One middleware: request id, metrics, error rendering, in that order (sidecar.middleware).
    app = web.Application(
        middlewares=[middleware.for_listener("public", services.metrics)],
        handler_args=handler_args(services),
    )
    app[SERVICES] = services
    app[LISTENER] = "public"
    app[PENDING_COOKIES] = PendingCookies(
        services.cookie_key, services.config.session, services.trusted_proxies
    )
    app.on_response_prepare.append(middleware.add_request_id_header)
    app.on_response_prepare.append(observe.prepare_hook(services.metrics))
    browser.add_routes(app)
    widget.add_routes(app)
    topup.add_routes(app)
    webhook.add_routes(app)  # Quota's server-to-server calls: no cookie, probe or Origin check
    app.router.add_route("*", "/auth/quota/{tail:.*}", _unknown_auth_path)
    upstream.add_routes(app)
    return app


def internal_key_check(services: Services) -> middleware.Check | None:
    """With ``identity.internal_api_key`` set, every internal call must carry it.

    Accepted as ``Authorization: Bearer <key>`` (OpenAI SDKs' ``api_key``) or ``x-api-key``
    (Anthropic SDKs' ``api_key``); compared in constant time. ``None`` when no key is set.
    """
    key = services.config.identity.internal_api_key
    if key is None:
        return None
    expected = key.reveal().encode()

    def check(request: web.Request) -> None:
        auth = request.headers.get("Authorization", "")
        given = auth[7:] if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), expected):
            raise InvalidApiKey

    return check


def create_internal_app(services: Services) -> web.Application:
    # The same middleware, ending with the internal API key's check (sidecar.middleware).
    app = web.Application(
        middlewares=[
            middleware.for_listener(
                "internal", services.metrics, check=internal_key_check(services)
            )
        ],
        handler_args=handler_args(services),
    )
    app[SERVICES] = services
    app[LISTENER] = "internal"
    app.on_response_prepare.append(middleware.add_request_id_header)
    app.on_response_prepare.append(observe.prepare_hook(services.metrics))
    quota_forward.add_routes(app)
    backend.add_routes(app)
    users.add_routes(app)
    topup.note_topup_origin(services.config)
    return app


# The admin listener closes last; its handlers are quick.
ADMIN_SHUTDOWN_S = 1.0
# aiohttp reads a shutdown timeout of 0 as "no timeout": "cut at once" is the smallest wait.
MIN_GRACE_S = 0.001


@dataclass
class Sidecar:
    """Serves the listeners until ``stop()``; ``urls`` names where they ended up.

    ``shutdown()`` is what SIGTERM runs, in this order:

    1. ``/readyz`` answers 503 at once, so the pod leaves the Service's endpoints;
    2. for ``shutdown.drain_delay_s`` the listeners still accept, while load balancers and
       kube-proxy catch up;
    3. the public and internal listeners close their ports (new connections are refused) and
       idle keep-alive connections; requests and streams in flight get up to
       ``shutdown.grace_s`` to finish, then are cancelled;
    4. the admin listener closes.
    """

    services: Services
    runners: list[web.AppRunner] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)
    health: Health = field(default_factory=Health)

    async def start(self, *, reuse_port: bool = False) -> None:
        """Bind and serve every listener; ``reuse_port`` joins the other workers' sockets."""
        cfg = self.services.config
        grace_s = max(cfg.shutdown.grace_s, MIN_GRACE_S)
        listeners = [
            ("public", create_public_app(self.services), cfg.listen.public, grace_s),
            ("internal", create_internal_app(self.services), cfg.listen.internal, grace_s),
        ]
        if cfg.listen.admin_address is not None:
            admin = create_admin_app(self.services, self.health)
            listeners.append(("admin", admin, cfg.listen.admin_address, ADMIN_SHUTDOWN_S))
        for name, app, address, shutdown_s in listeners:
            # Every listener's connections: strict line endings and a bound on slow heads
            # (sidecar.protocol), and the parser limits and keep-alive idle of handler_args
            # (the admin app sets none of its own).
            runner = GuardedAppRunner(
                app,
                header_timeout_s=cfg.limits.header_timeout_s,
                access_log_class=AccessLogger,
                # Probes and scrapes every few seconds would drown the log; /metrics counts them.
                access_log=ACCESS_LOGGER if name != "admin" else None,
                handler_cancellation=True,  # a client that leaves cancels its upstream call
                shutdown_timeout=shutdown_s,
                **handler_args(self.services),
            )
            await runner.setup()
            self.runners.append(runner)
            host, port = split_host_port(address)
            site = web.TCPSite(
                runner,
                host,
                port,
                reuse_address=True,
                reuse_port=reuse_port or None,
                backlog=cfg.limits.backlog,
            )
            await site.start()
            self.urls[name] = _bound_url(runner, host)
            log.info("%s listener on %s", name, self.urls[name])

    async def shutdown(self) -> None:
        """Leave the load balancer first, then stop (see the class docstring)."""
        cfg = self.services.config.shutdown
        self.health.draining = True
        log.info(
            "shutting down: not ready; listeners close in %g s, then requests in flight get "
            "up to %g s",
            cfg.drain_delay_s,
            cfg.grace_s,
        )
        await asyncio.sleep(cfg.drain_delay_s)
        await self.stop()

    async def stop(self) -> None:
        """Close the listeners now; requests in flight get up to ``shutdown.grace_s``."""
        self.health.draining = True
        serving = [r for r in self.runners if r.app[LISTENER] != "admin"]
        admin = [r for r in self.runners if r.app[LISTENER] == "admin"]
        # Together, so the grace period is shared rather than spent once per listener.
        results = await asyncio.gather(*(r.cleanup() for r in serving), return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.warning("a listener did not close cleanly: %r", result)
        for runner in admin:
            await runner.cleanup()
        self.runners.clear()
        log.info("listeners closed")


def _bound_url(runner: web.AppRunner, host: str) -> str:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            shown = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
            return f"http://{shown}:{addr[1]}"
    return f"http://{host}"
