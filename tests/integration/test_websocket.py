"""WebSockets pass through the public listener both ways, with pings and close codes."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.integration.conftest import Stack


@pytest.mark.parametrize(
    "connection", ["Upgrade", "keep-alive, Upgrade", "Upgrade, keep-alive", "upgrade"]
)
async def test_websocket_echo_through_the_public_listener(stack: Stack, connection: str) -> None:
    # aiohttp sends "Connection: Upgrade"; browsers send "keep-alive, Upgrade".
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            f"{stack.public_url}/ws",
            protocols=("chat.v1",),
            autoping=False,
            headers={"Connection": connection, "X-Quota-User": "mallory"},
        ) as ws,
    ):
        assert ws.protocol == "chat.v1"
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "echo:hello"
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive(timeout=5)).data == b"echo:\x00\x01"
        await ws.ping(b"are-you-there")
        pong = await ws.receive(timeout=5)
        assert pong.type is aiohttp.WSMsgType.PONG
        assert pong.data == b"are-you-there"
        await ws.close(code=4001)
    await asyncio.sleep(0.1)
    assert stack.upstream.ws_close_codes[-1] == 4001
    seen = stack.upstream.requests[-1].headers
    assert not any(k.lower() == "x-quota-user" for k in seen)


async def test_an_upstream_close_code_reaches_the_browser(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{stack.public_url}/ws") as ws:
        await ws.send_str("close:4000")
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4000


async def test_a_refused_upgrade_returns_the_upstreams_answer(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{stack.public_url}/not-a-websocket")
        assert refused.value.status == 200 or refused.value.status >= 400


async def test_a_v1_websocket_reaches_quota_with_the_users_token_not_the_clients(
    stack: Stack,
) -> None:
    await stack.connect("alice")
    url = f"{stack.internal_url}/v1/realtime".replace("http://", "ws://")
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            url,
            headers={
                "X-Quota-User": "alice",
                "Authorization": "Bearer sk-quota-hostappkey",
                "Connection": "keep-alive, Upgrade",
            },
        ) as ws,
    ):
        await ws.send_str("hello")
        echo = json.loads((await ws.receive(timeout=5)).data)
        assert echo["type"] == "echo"
        assert echo["text"] == "hello"
        await ws.send_bytes(b"\x01\x02")
        assert (await ws.receive(timeout=5)).data == b"\x01\x02"
        await ws.send_str("close:4002")
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4002
    assert stack.quota.counters["realtime.sessions"] == 1
    sent = [r for r in stack.quota.requests if r.path == "/v1/realtime"][-1]
    assert sent.headers["Authorization"].startswith("Bearer quota_token_")
    assert "X-Quota-User" not in sent.headers


async def test_a_v1_websocket_without_a_wallet_is_refused_before_the_upgrade(stack: Stack) -> None:
    url = f"{stack.internal_url}/v1/realtime".replace("http://", "ws://")
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url, headers={"X-Quota-User": "nobody"})
    assert refused.value.status == 401
