"""The demo host app against a stub of the sidecar's internal listener, over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpClient, AiohttpServer

from sidecar.demo.hostapp import create_host_app

SECRET = b"demo-cookie-secret-for-tests"
SSE_CHUNKS = (
    b'data: {"choices": [{"delta": {"content": "Hello"}}]}\n\n',
    b'data: {"choices": [{"delta": {"content": " there"}}]}\n\ndata: {"choi',
    b'ces": [{"delta": {"content": "!"}}], "usage": {"total_tokens": 5}, '
    b'"quota": {"credits_used": 1200, "balance_before": 5000000, "balance_after": 4998800}}\n\n',
    b"data: [DONE]\n\n",
)
INSUFFICIENT_CREDITS = (
    b'{"error": {"code": "insufficient_credits", "message": "Top up your wallet.", '
    b'"type": "billing_error"}}'
)

HostClient = TestClient[web.Request, web.Application]


@dataclass
class StubSidecar:
    """The sidecar's internal listener: records each request, then answers as configured.

    By default it streams ``SSE_CHUNKS`` with small pauses. With ``hold_after_first`` it waits
    for ``release`` after the first chunk, so a test can prove that chunk already reached it.
    """

    chunks: tuple[bytes, ...] = SSE_CHUNKS
    hold_after_first: bool = False
    status: int = 200
    error_body: bytes = INSUFFICIENT_CREDITS
    error_content_type: str = "application/json"
    extra_headers: dict[str, str] = field(default_factory=dict)
    cut_after_first: bool = False
    requests: list[tuple[CIMultiDict[str], Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((CIMultiDict(request.headers), await request.json()))
        if self.status != 200:
            return web.Response(
                status=self.status,
                body=self.error_body,
                headers={"Content-Type": self.error_content_type, **self.extra_headers},
            )
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", **self.extra_headers}
        )
        await response.prepare(request)
        for index, chunk in enumerate(self.chunks):
            if index == 1 and self.hold_after_first:
                await self.release.wait()
            if index == 1 and self.cut_after_first:
                await response.write(b'data: {"choices": [{"del')
                assert request.transport is not None
                request.transport.abort()
                return response
            await response.write(chunk)
            await asyncio.sleep(0.01)
        self.finished.set()
        await response.write_eof()
        return response

    @property
    def last_headers(self) -> CIMultiDict[str]:
        return self.requests[-1][0]


StartHost = Callable[..., Awaitable[HostClient]]


@pytest.fixture
def start_host(aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer) -> StartHost:
    """Start a stub sidecar and the host app pointed at it; returns the browser's client."""

    async def start(stub: StubSidecar | None = None, **options: Any) -> HostClient:
        if "internal_url" not in options:
            server = await aiohttp_server((stub or StubSidecar()).app())
            options["internal_url"] = str(server.make_url("/"))
        options.setdefault("cookie_secret", SECRET)
        return await aiohttp_client(create_host_app(**options))

    return start


async def sign_in(client: HostClient, name: str = "ada") -> None:
    response = await client.post("/login", data={"name": name}, allow_redirects=False)
    assert response.status == 303
    assert response.headers["Location"] == "/"


def session_cookie(client: HostClient) -> str:
    return client.session.cookie_jar.filter_cookies(client.make_url("/"))["demo_user"].value


async def chat(client: HostClient, message: str = "hello") -> tuple[int, bytes]:
    async with client.post("/api/chat", json={"message": message}) as response:
        return response.status, await response.read()


# --- sign-in and the identity endpoint --------------------------------------------------------


async def test_signing_in_sets_an_http_only_lax_cookie_and_redirects_home(
    start_host: StartHost,
) -> None:
    client = await start_host()

    response = await client.post("/login", data={"name": "ada"}, allow_redirects=False)

    assert response.status == 303
    assert response.headers["Location"] == "/"
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("demo_user=")
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Path=/" in cookie


async def test_whoami_names_the_signed_in_user_in_the_identity_header(
    start_host: StartHost,
) -> None:
    client = await start_host()
    await sign_in(client, "ada")

    response = await client.get("/quota/whoami")

    assert response.status == 200
    assert response.headers["X-Quota-User"] == "ada"
    assert response.headers["Cache-Control"] == "no-store"
    assert await response.json() == {"user": "ada"}


async def test_whoami_uses_the_configured_identity_header(start_host: StartHost) -> None:
    client = await start_host(identity_header="X-App-User")
    await sign_in(client, "ada")

    response = await client.get("/quota/whoami")

    assert response.headers["X-App-User"] == "ada"
    assert "X-Quota-User" not in response.headers


async def test_whoami_percent_encodes_a_name_that_is_not_a_plain_header_value(
    start_host: StartHost,
) -> None:
    client = await start_host()
    await sign_in(client, "  Ada Lovelace-Ü  ")

    response = await client.get("/quota/whoami")

    assert response.headers["X-Quota-User"] == "Ada%20Lovelace-%C3%9C"
    assert await response.json() == {"user": "Ada Lovelace-Ü"}


async def test_whoami_answers_401_without_a_cookie(start_host: StartHost) -> None:
    client = await start_host()

    response = await client.get("/quota/whoami")

    assert response.status == 401
    assert response.headers["Cache-Control"] == "no-store"
    assert "X-Quota-User" not in response.headers
    assert await response.json() == {"error": "not_signed_in"}


def _other_name(cookie: str) -> str:
    _, mac = cookie.split(".")
    return base64.urlsafe_b64encode(b"mallory").rstrip(b"=").decode() + "." + mac


def _flipped_mac(cookie: str) -> str:
    return cookie[:-1] + ("A" if cookie[-1] != "A" else "B")


@pytest.mark.parametrize(
    "tamper",
    [_other_name, _flipped_mac, lambda cookie: cookie.split(".")[0], lambda _: "garbage.!!"],
    ids=["name-swapped", "mac-flipped", "mac-removed", "garbage"],
)
async def test_whoami_answers_401_for_a_tampered_cookie(
    start_host: StartHost, tamper: Callable[[str], str]
) -> None:
    client = await start_host()
    await sign_in(client, "ada")
    forged = tamper(session_cookie(client))
    client.session.cookie_jar.clear()

    response = await client.get("/quota/whoami", headers={"Cookie": f"demo_user={forged}"})

    assert response.status == 401


async def test_whoami_rejects_a_cookie_signed_with_another_secret(start_host: StartHost) -> None:
    other = await start_host(cookie_secret=b"another-secret")
    await sign_in(other, "ada")
    client = await start_host()

    response = await client.get(
        "/quota/whoami", headers={"Cookie": f"demo_user={session_cookie(other)}"}
    )

    assert response.status == 401


async def test_logout_clears_the_cookie_and_signs_the_user_out(start_host: StartHost) -> None:
    client = await start_host()
    await sign_in(client)

    response = await client.post("/logout", allow_redirects=False)

    assert response.status == 303
    assert response.headers["Location"] == "/"
    assert "Max-Age=0" in response.headers["Set-Cookie"]
    assert (await client.get("/quota/whoami")).status == 401


@pytest.mark.parametrize("name", ["", "   ", "x" * 65, "a\x00b", "tab\there"])
async def test_login_refuses_an_empty_overlong_or_unprintable_name(
    start_host: StartHost, name: str
) -> None:
    client = await start_host()

    response = await client.post("/login", data={"name": name}, allow_redirects=False)

    assert response.status == 303
    assert response.headers["Location"] == "/?signin_error=invalid_name"
    assert "Set-Cookie" not in response.headers


async def test_login_accepts_a_name_of_exactly_64_characters(start_host: StartHost) -> None:
    client = await start_host()
    await sign_in(client, "x" * 64)

    assert await (await client.get("/quota/whoami")).json() == {"user": "x" * 64}


async def test_cross_site_posts_are_refused(start_host: StartHost) -> None:
    client = await start_host()

    response = await client.post(
        "/login",
        data={"name": "mallory"},
        headers={"Sec-Fetch-Site": "cross-site"},
        allow_redirects=False,
    )

    assert response.status == 403
    assert "Set-Cookie" not in response.headers


# --- /api/chat ---------------------------------------------------------------------------------


async def test_chat_requires_sign_in(start_host: StartHost) -> None:
    stub = StubSidecar()
    client = await start_host(stub)

    status, body = await chat(client)

    assert status == 401
    assert json.loads(body)["error"]["code"] == "not_signed_in"
    assert stub.requests == []


async def test_chat_sends_the_identity_header_and_an_openai_streaming_request(
    start_host: StartHost,
) -> None:
    stub = StubSidecar()
    client = await start_host(stub)
    await sign_in(client, "ada")

    status, _ = await chat(client, "  What is in my notes?  ")

    assert status == 200
    headers, body = stub.requests[0]
    assert headers["X-Quota-User"] == "ada"
    assert headers["Content-Type"] == "application/json"
    assert "Cookie" not in headers
    assert body == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "What is in my notes?"}],
        "stream": True,
    }


async def test_chat_sends_the_configured_identity_header(start_host: StartHost) -> None:
    stub = StubSidecar()
    client = await start_host(stub, identity_header="X-App-User")
    await sign_in(client, "ada")

    await chat(client)

    assert stub.last_headers["X-App-User"] == "ada"
    assert "X-Quota-User" not in stub.last_headers


@pytest.mark.parametrize(
    ("api_key", "authorization"),
    [(None, None), ("", None), ("internal-key-123", "Bearer internal-key-123")],
    ids=["no-key", "empty-key", "key"],
)
async def test_chat_sends_authorization_only_when_an_internal_api_key_is_configured(
    start_host: StartHost, api_key: str | None, authorization: str | None
) -> None:
    stub = StubSidecar()
    client = await start_host(stub, internal_api_key=api_key)
    await sign_in(client)

    await chat(client)

    assert stub.last_headers.get("Authorization") == authorization


async def test_chat_streams_each_chunk_before_the_sidecar_has_sent_the_last(
    start_host: StartHost,
) -> None:
    stub = StubSidecar(hold_after_first=True)
    client = await start_host(stub)
    await sign_in(client)

    async with client.post("/api/chat", json={"message": "hello"}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-cache"
        first = b""
        while b"\n\n" not in first:
            first += await asyncio.wait_for(response.content.readany(), timeout=5)
        assert first == SSE_CHUNKS[0]
        assert not stub.finished.is_set()

        stub.release.set()
        rest = await response.read()

    assert first + rest == b"".join(SSE_CHUNKS)


async def test_chat_passes_a_402_error_through_with_its_status_and_body(
    start_host: StartHost,
) -> None:
    client = await start_host(StubSidecar(status=402))
    await sign_in(client)

    async with client.post("/api/chat", json={"message": "hello"}) as response:
        assert response.status == 402
        assert response.headers["Content-Type"].startswith("application/json")
        assert await response.read() == INSUFFICIENT_CREDITS


async def test_chat_wraps_a_non_json_sidecar_error_and_keeps_retry_after(
    start_host: StartHost,
) -> None:
    stub = StubSidecar(
        status=503,
        error_body=b"<html>Service Unavailable</html>",
        error_content_type="text/html",
        extra_headers={"Retry-After": "7"},
    )
    client = await start_host(stub)
    await sign_in(client)

    async with client.post("/api/chat", json={"message": "hello"}) as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "7"
        assert (await response.json())["error"]["code"] == "sidecar_error"


async def test_chat_ends_a_cut_off_stream_with_an_error_event(start_host: StartHost) -> None:
    client = await start_host(StubSidecar(cut_after_first=True))
    await sign_in(client)

    status, body = await chat(client)

    assert status == 200
    assert body.startswith(SSE_CHUNKS[0])
    last_event = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last_event.startswith(b"data: ")
    assert json.loads(last_event[len(b"data: ") :])["error"]["code"] == "sidecar_unavailable"


async def test_chat_never_carries_one_users_sidecar_cookies_into_anothers_call(
    start_host: StartHost,
) -> None:
    stub = StubSidecar(extra_headers={"Set-Cookie": "sticky=ada-only; Path=/"})
    client = await start_host(stub)
    await sign_in(client, "ada")
    await chat(client)
    await sign_in(client, "bob")

    await chat(client)

    assert stub.last_headers["X-Quota-User"] == "bob"
    assert "Cookie" not in stub.last_headers


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b"{}",
        b'{"message": 5}',
        b'{"message": ""}',
        b'{"message": "   "}',
        json.dumps({"message": "x" * 4001}).encode(),
    ],
    ids=["not-json", "not-object", "missing", "not-string", "empty", "blank", "too-long"],
)
async def test_chat_rejects_an_invalid_message_with_400(start_host: StartHost, body: bytes) -> None:
    stub = StubSidecar()
    client = await start_host(stub)
    await sign_in(client)

    response = await client.post(
        "/api/chat", data=body, headers={"Content-Type": "application/json"}
    )

    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_message"
    assert stub.requests == []


async def test_chat_accepts_a_message_of_exactly_4000_characters(start_host: StartHost) -> None:
    stub = StubSidecar()
    client = await start_host(stub)
    await sign_in(client)

    status, _ = await chat(client, "x" * 4000)

    assert status == 200
    assert stub.requests[0][1]["messages"][0]["content"] == "x" * 4000


async def test_chat_answers_502_when_the_sidecar_is_down(
    start_host: StartHost, unused_tcp_port: int
) -> None:
    client = await start_host(internal_url=f"http://127.0.0.1:{unused_tcp_port}")
    await sign_in(client)

    status, body = await chat(client)

    assert status == 502
    assert json.loads(body)["error"]["code"] == "sidecar_unavailable"


# --- the page ----------------------------------------------------------------------------------

SIGNED_IN_IDS = (
    "signout",
    "status",
    "balance",
    "connect",
    "disconnect",
    "chat-input",
    "chat-send",
    "chat-output",
    "chat-cost",
    "error",
)


async def test_home_page_shows_the_sign_in_form_when_signed_out(start_host: StartHost) -> None:
    client = await start_host()

    response = await client.get("/")
    page = await response.text()

    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert 'action="/login"' in page
    assert 'id="signin-name"' in page
    assert 'name="name"' in page
    assert 'id="signin"' in page
    assert 'id="error"' in page
    assert 'id="chat-input"' not in page


async def test_home_page_shows_the_wallet_and_chat_ui_when_signed_in(
    start_host: StartHost,
) -> None:
    client = await start_host()
    await sign_in(client, "ada")

    page = await (await client.get("/")).text()

    for element_id in SIGNED_IN_IDS:
        assert f'id="{element_id}"' in page, element_id
    assert 'href="/auth/quota/connect?return_to=/"' in page
    assert ">ada</strong>" in page
    assert 'id="signin-name"' not in page


async def test_home_page_is_self_contained_with_a_nonce_policy(start_host: StartHost) -> None:
    client = await start_host()
    await sign_in(client)

    response = await client.get("/")
    page = await response.text()

    nonce = re.search(r"script-src 'nonce-([^']+)'", response.headers["Content-Security-Policy"])
    assert nonce is not None
    assert f'<script nonce="{nonce[1]}">' in page
    assert f'<style nonce="{nonce[1]}">' in page
    assert "<script src" not in page
    assert 'rel="stylesheet"' not in page
    assert "{{" not in page


async def test_home_page_escapes_the_user_name(start_host: StartHost) -> None:
    client = await start_host()
    await sign_in(client, "<img src=x onerror=alert(1)>")

    page = await (await client.get("/")).text()

    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
