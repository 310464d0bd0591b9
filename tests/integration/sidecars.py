"""More sidecars in the test process, beside a ``stack``'s: other replicas, other settings.

``another_sidecar`` starts a sidecar on its own ports that talks to the stack's emulator and host
app and, when given the stack's Redis, shares the stack's token records (same prefix, same
``session.secret``): a second replica. It registers its own OAuth client on the emulator, with
its own callback URL, and sets ``quota.redirect_uri`` to it.

``FaultyQuota`` is a reverse proxy in front of the emulator that answers chosen paths with a 500,
for faults the emulator has no knob for.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.app import Sidecar
from sidecar.services import Services, make_sealer, open_services
from sidecar.tokens.factory import create_store
from tests.integration.conftest import Stack, free_port
from tests.support import make_config

_HOP_BY_HOP = frozenset(
    {"connection", "content-length", "content-encoding", "transfer-encoding", "keep-alive"}
)


@dataclass
class Running:
    services: Services
    public_url: str
    internal_url: str
    callback_url: str


@contextlib.asynccontextmanager
async def another_sidecar(
    stack: Stack,
    *,
    store_spec: str = "memory",
    quota_url: str | None = None,
    same_app: bool = False,
    **sections: dict[str, Any],
) -> AsyncIterator[Running]:
    """A sidecar beside ``stack``'s (see the module docstring); ``sections`` override config.

    ``same_app``: the stack's OAuth client and callback URL, as a replica of the same app has.
    """
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    if same_app:
        client, callback_url = stack.client, f"{stack.public_url}/auth/quota/callback"
    else:
        callback_url = f"{public_url}/auth/quota/callback"
        client = stack.quota.register_client(name="Another Test App", redirect_uris=[callback_url])
    doc: dict[str, dict[str, Any]] = {
        "quota": {
            "base_url": quota_url or stack.quota_url,
            "client_id": client.client_id,
            "client_secret": client.client_secret,
            "redirect_uri": callback_url,
        },
        "listen": {"public": f"127.0.0.1:{port}", "internal": "127.0.0.1:0"},
        "upstream": {"url": stack.upstream_url},
        "tokens": {"key_prefix": stack.config.tokens.key_prefix},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    config = make_config(**doc)
    store = create_store(store_spec, make_sealer(config), prefix=config.tokens.key_prefix)
    async with open_services(config, clock=stack.clock, store=store) as services:
        sidecar = Sidecar(services)
        await sidecar.start()
        try:
            yield Running(services, public_url, sidecar.urls["internal"], callback_url)
        finally:
            await sidecar.stop()


class FaultyQuota:
    """Forwards everything to ``target`` except ``failing`` paths, which answer 500."""

    def __init__(self, target: str, failing: Iterable[str]) -> None:
        self.target = target
        self.failing = set(failing)
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._handle)
        self._http: aiohttp.ClientSession | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        if request.path in self.failing:
            return web.json_response({"error": {"code": "server_error"}}, status=500)
        if self._http is None:
            self._http = aiohttp.ClientSession(auto_decompress=False)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with self._http.request(
            request.method,
            self.target + request.path_qs,
            headers=headers,
            data=await request.read(),
            allow_redirects=False,
        ) as resp:
            body = await resp.read()
            out = [(k, v) for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP]
            return web.Response(status=resp.status, headers=out, body=body)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()


async def start_faulty_quota(
    aiohttp_server: Callable[..., Any], stack: Stack, failing: Iterable[str]
) -> tuple[FaultyQuota, str]:
    proxy = FaultyQuota(stack.quota_url, failing)
    server = await aiohttp_server(proxy.app)
    return proxy, str(server.make_url("")).rstrip("/")
