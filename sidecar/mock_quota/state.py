"""The emulator's whole in-memory world: clients, developers, wallets, grants, checkouts, counters.

One ``MockQuota`` backs one emulator app (stored under ``MOCK_QUOTA_KEY``). Tests build it with
an injected clock, seed it through its methods, then assert on ``counters`` and ``requests``.

Counter keys (``state.counters``, a ``collections.Counter``):

    requests                     every request to a Quota route (control routes excluded)
    token.authorization_code     /oauth/token calls with that grant_type, whatever the outcome
    token.refresh_token          /oauth/token refresh calls received, successful or not
    token.refresh_ok             refreshes that returned a new pair
    token.refresh_reuse          a rotated refresh token presented again (grant revoked)
    token.errors                 /oauth/token error answers, injected ones included
    token.injected_failures      answers forced by token_fail_status / token_fail_count
    authorize.approved           consents given (form or auto_approve_email)
    authorize.denied             consents refused
    revoke                       /oauth/revoke calls
    userinfo                     /oauth/userinfo calls
    chat.completions             /v1/chat/completions calls, whatever the outcome
    chat.streamed                streams started (credits held)
    chat.stream_aborted          streams cut off by the client before [DONE]
    chat.insufficient_credits    402 answers on /v1/chat/completions
    messages.insufficient_credits  402 answers on /v1/messages
    balance                      /v1/balance calls
    models                       /v1/models calls
    apps.created                 apps registered through /developers/apps
    messages                     /v1/messages calls, whatever the outcome
    messages.streamed            message streams started (credits held)
    messages.stream_aborted      message streams cut off by the client
    realtime.sessions            /v1/realtime WebSocket sessions accepted
    packages                     /v1/packages calls
    checkout.created             checkout sessions created
    checkout.paid                checkouts paid (wallet credited)
    checkout.canceled            checkouts canceled
    users.disconnected           dashboard disconnects (POST /_mock/users/{user_id}/disconnect)
    webhooks.sent                events handed to delivery (webhook_url set)
    webhooks.skipped             events not sent because webhook_url is unset
    webhooks.delivered           events a receiver answered with 2xx
    webhooks.failed              events given up on after every retry

The webhook deliveries themselves are recorded by the app's ``WebhookSender`` (``webhooks``),
which owns the HTTP session that sends them.
"""

from __future__ import annotations

import collections
import hmac
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .checkouts import CheckoutBook
from .clients import Client, new_id
from .grants import GrantBook
from .scopes import CREDITS_READ, CREDITS_SPEND, format_scope, parse_scope
from .settings import MockSettings
from .wallets import Wallets, normalize_email

# The seeded developer account; a local emulator's well-known password.
SEED_DEVELOPER_EMAIL = "dev@quota.local"
SEED_DEVELOPER_PASSWORD = "quota-dev-password"  # noqa: S105
REQUEST_LOG_SIZE = 200


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received; header repeats are joined with ", "."""

    method: str
    path: str
    query_string: str
    headers: dict[str, str]
    body: bytes


class MockQuota:
    """Everything the emulator knows. Not thread-safe; one event loop owns it."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        settings: MockSettings | None = None,
    ) -> None:
        self.clock = clock
        self.settings = settings if settings is not None else MockSettings()
        self.counters: collections.Counter[str] = collections.Counter()
        self.requests: collections.deque[RecordedRequest] = collections.deque(
            maxlen=REQUEST_LOG_SIZE
        )
        self.clients: dict[str, Client] = {}
        self.wallets = Wallets(lambda: self.settings.default_balance)
        self.grants = GrantBook(clock)
        self.checkouts = CheckoutBook(clock)
        self._developer_passwords: dict[str, str] = {}
        self._sessions: dict[str, str] = {}
        self.add_developer(SEED_DEVELOPER_EMAIL, SEED_DEVELOPER_PASSWORD)

    # -- clients and developers --------------------------------------------------------------

    def register_client(
        self,
        *,
        name: str,
        redirect_uris: Iterable[str],
        allowed_scopes: Iterable[str] = (CREDITS_READ, CREDITS_SPEND),
        client_id: str | None = None,
        client_secret: str | None = None,
        owner_email: str | None = None,
        public: bool = False,
    ) -> Client:
        """Register an app; ids are generated when not given. Replaces a client with that id."""
        client = Client(
            client_id=client_id or new_id("quota_client_"),
            client_secret=client_secret or new_id("quota_secret_", 30),
            name=name,
            redirect_uris=tuple(redirect_uris),
            allowed_scopes=tuple(allowed_scopes),
            created_at=self.clock(),
            owner_email=normalize_email(owner_email) if owner_email else None,
            public=public,
        )
        self.clients[client.client_id] = client
        return client

    def add_developer(self, email: str, password: str) -> None:
        self._developer_passwords[normalize_email(email)] = password

    def login(self, email: str, password: str) -> str | None:
        """A new ``sess_…`` token for a developer, or ``None`` for wrong credentials."""
        known = self._developer_passwords.get(normalize_email(email))
        if known is None or not hmac.compare_digest(known.encode(), password.encode()):
            return None
        session = new_id("sess_", 24)
        self._sessions[session] = normalize_email(email)
        return session

    def developer_for_session(self, session_token: str) -> str | None:
        return self._sessions.get(session_token)

    def apps_of(self, email: str) -> list[Client]:
        owner = normalize_email(email)
        return [c for c in self.clients.values() if c.owner_email == owner]

    # -- wallets ------------------------------------------------------------------------------

    def set_balance(self, email: str, balance: int) -> None:
        self.wallets.set(email, balance)

    def balance(self, email: str) -> int:
        return self.wallets.balance(email)

    # -- grants -------------------------------------------------------------------------------

    def issue_grant(
        self, client_id: str, email: str, scope: str = f"{CREDITS_READ} {CREDITS_SPEND}"
    ) -> dict[str, Any]:
        """Skip the browser: the JSON a successful /oauth/token code exchange would return."""
        if client_id not in self.clients:
            raise KeyError(f"unknown client_id {client_id!r}")
        pair = self.grants.start_grant(
            client_id,
            normalize_email(email),
            format_scope(parse_scope(scope)),
            self.settings.access_token_ttl_s,
        )
        return pair.to_json()

    # -- observation --------------------------------------------------------------------------

    def record(self, request: RecordedRequest) -> None:
        self.requests.append(request)
        self.counters["requests"] += 1

    def reset(self) -> None:
        """Forget counters and recorded requests (clients, wallets and grants stay)."""
        self.counters.clear()
        self.requests.clear()

    def snapshot(self) -> dict[str, object]:
        return {
            "counters": dict(sorted(self.counters.items())),
            "settings": self.settings.to_json(),
            "wallets": self.wallets.to_json(),
        }


MOCK_QUOTA_KEY: web.AppKey[MockQuota] = web.AppKey("mock_quota", MockQuota)
