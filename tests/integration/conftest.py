"""The whole stack on loopback: Quota emulator, stub host app, and the sidecar's real listeners."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from sidecar.app import Sidecar
from sidecar.config import Config
from sidecar.mock_quota import MockQuota, create_app
from sidecar.mock_quota.clients import Client
from sidecar.services import Services, make_sealer, open_services
from sidecar.tokens.crypto import Sealer
from sidecar.tokens.factory import create_store
from sidecar.tokens.model import TokenRecord
from sidecar.tokens.redis_store import RedisTokenStore
from sidecar.tokens.store import TokenStore
from tests.support import (
    Browser,
    FakeClock,
    StubUpstream,
    approve_consent,
    create_stub_upstream,
    make_config,
)


@pytest.fixture
async def redis_token_store(
    redis_url: str, redis_prefix: str, make_sealer: Callable[..., Sealer]
) -> AsyncIterator[RedisTokenStore]:
    """A Redis token store on the test Redis, under the test's own prefix; closed after it."""
    made = create_store(redis_url, make_sealer(), prefix=redis_prefix)
    assert isinstance(made, RedisTokenStore)
    yield made
    await made.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Stack:
    clock: FakeClock
    quota: MockQuota
    quota_url: str
    client: Client
    upstream: StubUpstream
    upstream_url: str
    config: Config
    services: Services
    store: TokenStore
    public_url: str
    internal_url: str
    admin_url: str
    browser: Browser
    backend: aiohttp.ClientSession  # the host app's backend calling the internal listener

    def user_key(self, user: str) -> str:
        return self.services.user_key(user)

    async def connect(self, user: str, email: str | None = None) -> aiohttp.ClientResponse:
        """The whole browser round-trip: sign in, connect, approve, land back."""
        self.browser.sign_in(self.public_url, user)
        consent = await self.browser.get(f"{self.public_url}/auth/quota/connect?return_to=/home")
        assert consent.status == 200, await consent.text()
        return await approve_consent(self.browser, consent, email or f"{user}@example.com")

    async def replace_grant(self, user: str, expected_version: int) -> dict[str, Any]:
        """Store a new grant of ``user``'s over the record at ``expected_version``, as a connect
        on another replica would (compare-and-set); Quota's token answer for it."""
        newer: dict[str, Any] = self.quota.issue_grant(self.client.client_id, f"{user}@example.com")
        written = await self.store.compare_and_set(
            self.user_key(user),
            expected_version,
            TokenRecord(
                access_token=newer["access_token"],
                refresh_token=newer["refresh_token"],
                expires_at=self.clock() + newer["expires_in"],
                scope=newer["scope"],
                obtained_at=self.clock(),
            ),
        )
        assert written is not None
        return newer

    async def chat(
        self, user: str, *, stream: bool = False, **extra: Any
    ) -> aiohttp.ClientResponse:
        return await self.backend.post(
            f"{self.internal_url}/v1/chat/completions",
            json={
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "hello there"}],
                "stream": stream,
                **extra,
            },
            headers={"X-Quota-User": user},
        )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store_kind() -> str:
    return "redis"


@pytest.fixture
def config_overrides() -> dict[str, dict[str, Any]]:
    return {}


@pytest.fixture
def store_spec(store_kind: str, redis_url: str) -> str:
    """Where the sidecar keeps tokens; override to point it elsewhere (a proxy, a cluster)."""
    return "memory" if store_kind == "memory" else redis_url


@pytest.fixture
async def stack(
    aiohttp_server: Callable[..., Any],
    clock: FakeClock,
    store_spec: str,
    redis_prefix: str,
    config_overrides: dict[str, dict[str, Any]],
) -> AsyncIterator[Stack]:
    quota = MockQuota(clock=clock)
    quota.settings.chunk_delay_s = 0.0
    quota_server = await aiohttp_server(create_app(quota))
    quota_url = str(quota_server.make_url("")).rstrip("/")
    upstream = create_stub_upstream()
    upstream_server = await aiohttp_server(upstream.app)
    upstream_url = str(upstream_server.make_url("")).rstrip("/")

    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    client = quota.register_client(
        name="Test App", redirect_uris=[f"{public_url}/auth/quota/callback"]
    )
    sections: dict[str, dict[str, Any]] = {
        "quota": {
            "base_url": quota_url,
            "client_id": client.client_id,
            "client_secret": client.client_secret,
        },
        "listen": {
            "public": f"127.0.0.1:{port}",
            "internal": "127.0.0.1:0",
            "admin": "127.0.0.1:0",
        },
        "upstream": {"url": upstream_url},
        "tokens": {"key_prefix": redis_prefix},
    }
    for name, values in config_overrides.items():
        sections.setdefault(name, {}).update(values)
    config = make_config(**sections)
    store = create_store(store_spec, make_sealer(config), prefix=redis_prefix)
    browser = Browser()
    backend = aiohttp.ClientSession()
    async with open_services(config, clock=clock, store=store) as services:
        sidecar = Sidecar(services)
        await sidecar.start()
        try:
            yield Stack(
                clock=clock,
                quota=quota,
                quota_url=quota_url,
                client=client,
                upstream=upstream,
                upstream_url=upstream_url,
                config=config,
                services=services,
                store=store,
                public_url=public_url,
                internal_url=sidecar.urls["internal"],
                admin_url=sidecar.urls["admin"],
                browser=browser,
                backend=backend,
            )
        finally:
            await sidecar.stop()
            await browser.close()
            await backend.close()
