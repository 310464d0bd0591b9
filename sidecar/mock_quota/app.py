"""Wiring: ``create_app(state)`` builds the emulator's aiohttp application around a ``MockQuota``."""

from __future__ import annotations

from aiohttp import web

from . import (
    api,
    authorize,
    control,
    developers,
    messages,
    oidc,
    realtime,
    token_endpoint,
    topup,
)
from .middleware import record_requests, render_errors
from .state import MOCK_QUOTA_KEY, MockQuota
from .webhooks import webhook_sender

# Roomier than aiohttp's 1 MiB default so tests can push large bodies through a forwarder.
CLIENT_MAX_SIZE = 16 * 1024 * 1024


def create_app(state: MockQuota) -> web.Application:
    """The emulator's app; ``state`` is shared, so a test can seed and inspect it directly."""
    # render_errors is outermost so that nothing, the recorder included, escapes as a bare 500;
    # record_requests runs before every handler so failing requests are recorded too.
    app = web.Application(
        middlewares=[render_errors, record_requests], client_max_size=CLIENT_MAX_SIZE
    )
    app[MOCK_QUOTA_KEY] = state
    # The webhook sender's HTTP session lives as long as the app; pending deliveries end with it.
    app.cleanup_ctx.append(webhook_sender)
    routed = (oidc, authorize, token_endpoint, api, messages, realtime, topup, developers, control)
    for module in routed:
        app.add_routes(module.routes())
    return app
