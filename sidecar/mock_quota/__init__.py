"""A faithful local stand-in for Quota (OAuth, /v1 API, developer API), like stripe-mock.

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

__all__ = [
    "MOCK_QUOTA_KEY",
    "Client",
    "MockQuota",
    "MockSettings",
    "RecordedRequest",
    "create_app",
    "start_mock_quota",
]
