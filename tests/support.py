"""Test building blocks: a fake clock, a stub host app, config and token factories, a browser.

Everything here is a real HTTP party (aiohttp servers and clients on loopback); only time is
faked, and only where expiry is compared.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp import web
from yarl import URL

from sidecar.config import Config
from sidecar.config_loader import build_config
from sidecar.tokens.model import TokenRecord

IDENTITY_COOKIE = "stub_user"
SESSION_SECRET = "s" * 40


class FakeClock:
    """A settable clock shared by the emulator and the sidecar."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_config(**sections: Mapping[str, Any]) -> Config:
    """A valid config; pass sections as dicts to override keys, e.g. ``quota={"base_url": …}``."""
    doc: dict[str, dict[str, Any]] = {
        "quota": {"client_id": "quota_client_test", "client_secret": "quota_secret_test"},
        "session": {"secret": SESSION_SECRET},
        # No admin listener unless a test asks for one: its default port is one per machine.
        "listen": {"admin": "off"},
        # Tests stop sidecars with streams still open: do not wait the production grace for them.
        "shutdown": {"drain_delay_s": 0, "grace_s": 2},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return build_config(doc, env={})


def make_tokens(
    *,
    now: float = 1_800_000_000.0,
    expires_in: float = 3600,
    scope: str = "credits.read credits.spend",
) -> TokenRecord:
    return TokenRecord(
        access_token="quota_token_" + "a" * 24,
        refresh_token="quota_refresh_" + "r" * 24,
        expires_at=now + expires_in,
        scope=scope,
        obtained_at=now,
    )


@dataclass
class Recorded:
    method: str
    path_qs: str
    headers: dict[str, list[str]]
    body: bytes


@dataclass
class StubUpstream:
    """The host app stand-in: an identity endpoint driven by a plain cookie, and an echo."""

    app: web.Application
    requests: list[Recorded] = field(default_factory=list)
    probe_calls: int = 0
    ws_close_codes: list[int | None] = field(default_factory=list)


def create_stub_upstream(identity_header: str = "X-Quota-User") -> StubUpstream:
    app = web.Application()
    stub = StubUpstream(app)

    async def whoami(request: web.Request) -> web.Response:
        stub.probe_calls += 1
        user = request.cookies.get(IDENTITY_COOKIE)
        if not user:
            return web.json_response({"error": "not_signed_in"}, status=401)
        return web.json_response({"user": user}, headers={identity_header: user})

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        stub.requests.append(
            Recorded(
                request.method,
                request.path_qs,
                {k: request.headers.getall(k) for k in request.headers},
                body,
            )
        )
        return web.json_response(
            {"method": request.method, "path_qs": request.path_qs, "body_len": len(body)},
            headers={"X-Stub": "yes"},
        )

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        """Echo; "close:<code>" makes the upstream close with that code."""
        stub.requests.append(
            Recorded(
                "WS", request.path_qs, {k: request.headers.getall(k) for k in request.headers}, b""
            )
        )
        ws = web.WebSocketResponse(protocols=("chat.v1",))
        await ws.prepare(request)
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT and msg.data.startswith("close:"):
                await ws.close(code=int(msg.data[6:]))
            elif msg.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"echo:{msg.data}")
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(b"echo:" + msg.data)
            elif msg.type is aiohttp.WSMsgType.CLOSE:
                stub.ws_close_codes.append(msg.data)  # the code the peer closed with
                break
            elif msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                break
        return ws

    app.router.add_get("/quota/whoami", whoami)
    app.router.add_get("/ws", websocket)
    app.router.add_route("*", "/{tail:.*}", echo)
    return stub


class Browser:
    """A cookie-keeping HTTP client that follows redirects across hosts, like a browser."""

    def __init__(self) -> None:
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    def sign_in(self, url: str, user: str) -> None:
        self.session.cookie_jar.update_cookies({IDENTITY_COOKIE: user}, URL(url))

    def sign_out(self, url: str) -> None:
        self.session.cookie_jar.clear(lambda c: c.key == IDENTITY_COOKIE)

    async def get(self, url: str, **kw: Any) -> aiohttp.ClientResponse:
        return await self.session.get(url, **kw)

    async def post(self, url: str, **kw: Any) -> aiohttp.ClientResponse:
        return await self.session.post(url, **kw)

    async def close(self) -> None:
        await self.session.close()


async def approve_consent(
    browser: Browser,
    consent: aiohttp.ClientResponse,
    email: str,
    *,
    decision: str = "approve",
    follow: bool = True,
) -> aiohttp.ClientResponse:
    """Submit the emulator's consent form as a person would (Approve or Deny)."""
    from html.parser import HTMLParser

    fields: dict[str, str] = {}

    class Form(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            a = dict(attrs)
            if tag == "input" and a.get("type") == "hidden" and a.get("name"):
                fields[a["name"] or ""] = a.get("value") or ""

    Form().feed(await consent.text())
    fields["email"] = email
    fields["decision"] = decision
    return await browser.post(
        str(consent.url.with_query(None)), data=fields, allow_redirects=follow
    )


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    buffer = b""
    async for chunk in resp.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            yield event.decode()


def json_of(event: str) -> Any:
    assert event.startswith("data: ")
    return json.loads(event[len("data: ") :])


class TcpProxy:
    """Forwards a loopback port to Redis; ``stop`` cuts every connection, ``start`` reopens."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for pipe in self._pipes:
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        self._pipes.clear()

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            self._pipes.add(asyncio.create_task(self._pipe(source, sink)))

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.close()


def through(proxy: TcpProxy, redis_url: str) -> str:
    parts = urlsplit(redis_url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{proxy.port}" if credentials else f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))
