"""A faithful local stand-in for Quota (OAuth, /v1 API, top-ups, webhooks, developer API).

Like stripe-mock, it is a real server with in-memory state that tests can steer through
``/_mock/*`` (see ``control``) or directly:

    state = MockQuota(clock=time.time)
    client = state.register_client(name="Demo", redirect_uris=["http://localhost:5180/cb"])
    app = create_app(state)          # an aiohttp app; state lives under MOCK_QUOTA_KEY

``sidecar.mock_quota.cli`` runs it as a process (``quota-sidecar mock-quota``);
``start_mock_quota`` runs it inside an existing event loop (the demo).
"""

from __future__ import annotations

from .app import create_app
from .cli import start_mock_quota
from .clients import Client
from .settings import MockSettings
from .state import MOCK_QUOTA_KEY, MockQuota, RecordedRequest
from .webhooks import WEBHOOKS_KEY, WebhookDelivery, WebhookSender

__all__ = [
    "MOCK_QUOTA_KEY",
    "WEBHOOKS_KEY",
    "Client",
    "MockQuota",
    "MockSettings",
    "RecordedRequest",
    "WebhookDelivery",
    "WebhookSender",
    "create_app",
    "start_mock_quota",
]
