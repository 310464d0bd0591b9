"""The Quota emulator's /v1 API: chat (plain and SSE) with billing, balance, models, auth errors."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient, TestServer

from sidecar.mock_quota import MockQuota, create_app

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
Http = TestClient[Any, Any]

CLIENT_ID = "quota_client_test"
EMAIL = "alice@example.com"
# gpt-4o-mini prices, in credits per token.
PRICE_IN, PRICE_OUT = 100, 400


@pytest.fixture
def quota() -> MockQuota:
    state = MockQuota()
    state.settings.chunk_delay_s = 0
    state.register_client(
        name="Demo", redirect_uris=["https://app.example/cb"], client_id=CLIENT_ID
    )
    return state


@pytest.fixture
async def http(aiohttp_client: ClientFactory, quota: MockQuota) -> Http:
    return await aiohttp_client(create_app(quota))


def token_for(quota: MockQuota, scope: str = "credits.read credits.spend") -> dict[str, str]:
    tokens = quota.issue_grant(CLIENT_ID, EMAIL, scope=scope)
    return {"Authorization": f"Bearer {tokens['access_token']}"}


def chat_body(text: str = "hello quota", **extra: object) -> dict[str, object]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def parse_events(raw: str) -> list[str]:
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    assert all(event.startswith("data: ") for event in events)
    return [event[len("data: ") :] for event in events]


async def test_chat_answers_in_openai_shape_and_charges_exactly_credits_used(
    http: Http, quota: MockQuota
) -> None:
    quota.set_balance(EMAIL, 1_000_000)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "say hello to the demo"},
    ]
    resp = await http.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": messages},
        headers=token_for(quota),
    )
    body = await resp.json()
    assert resp.status == 200, body
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-4o-mini"
    assert isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith("Echo from Quota: say hello to the demo")
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    completion_words = len(choice["message"]["content"].split())
    assert 10 <= completion_words <= 21
    assert usage == {
        "prompt_tokens": 7,
        "completion_tokens": completion_words,
        "total_tokens": 7 + completion_words,
    }
    cost = 7 * PRICE_IN + completion_words * PRICE_OUT
    assert body["quota"] == {
        "credits_used": cost,
        "balance_before": 1_000_000,
        "balance_after": 1_000_000 - cost,
        "billing_mode": "user",
    }
    assert quota.balance(EMAIL) == 1_000_000 - cost
    assert quota.counters["chat.completions"] == 1


async def test_chat_replies_are_deterministic(http: Http, quota: MockQuota) -> None:
    headers = token_for(quota)
    replies = [
        (await (await http.post("/v1/chat/completions", json=chat_body(), headers=headers)).json())
        for _ in range(2)
    ]
    assert replies[0]["choices"] == replies[1]["choices"]


async def test_chat_stops_at_max_tokens_with_finish_reason_length(
    http: Http, quota: MockQuota
) -> None:
    resp = await http.post(
        "/v1/chat/completions", json=chat_body(max_tokens=3), headers=token_for(quota)
    )
    body = await resp.json()
    assert body["choices"][0]["message"]["content"] == "Echo from Quota:"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


async def test_chat_stream_sends_each_word_as_its_own_event_over_time(
    aiohttp_server: ServerFactory, quota: MockQuota
) -> None:
    quota.settings.chunk_delay_s = 0.05
    quota.set_balance(EMAIL, 1_000_000)
    server = await aiohttp_server(create_app(quota))
    arrivals: list[tuple[float, bytes]] = []
    async with (
        ClientSession() as session,
        session.post(
            server.make_url("/v1/chat/completions"),
            json=chat_body(stream=True),
            headers=token_for(quota),
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        async for chunk in resp.content.iter_any():
            arrivals.append((time.monotonic(), chunk))

    raw = b"".join(chunk for _, chunk in arrivals).decode()
    events = parse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.startswith("Echo from Quota: hello quota.")
    words = len(text.split())
    assert len(chunks) == words + 1

    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": words,
        "total_tokens": 2 + words,
    }
    cost = 2 * PRICE_IN + words * PRICE_OUT
    assert final["quota"]["credits_used"] == cost
    assert final["quota"]["balance_after"] == 1_000_000 - cost
    assert quota.balance(EMAIL) == 1_000_000 - cost
    assert quota.counters["chat.streamed"] == 1

    assert len(arrivals) >= words // 2, "events must reach the client separately"
    assert arrivals[-1][0] - arrivals[0][0] >= 0.05 * (words - 1) * 0.8


async def test_a_stream_cut_short_is_charged_only_for_what_was_sent(
    aiohttp_server: ServerFactory, quota: MockQuota
) -> None:
    quota.settings.chunk_delay_s = 0.05
    quota.set_balance(EMAIL, 1_000_000)
    server = await aiohttp_server(create_app(quota))
    async with ClientSession() as session:
        resp = await session.post(
            server.make_url("/v1/chat/completions"),
            json=chat_body(stream=True),
            headers=token_for(quota),
        )
        await resp.content.readuntil(b"\n\n")
        resp.close()
    for _ in range(100):
        if quota.counters["chat.stream_aborted"]:
            break
        await asyncio.sleep(0.02)
    assert quota.counters["chat.stream_aborted"] == 1
    spent = 1_000_000 - quota.balance(EMAIL)
    assert 2 * PRICE_IN + PRICE_OUT <= spent < 2 * PRICE_IN + 10 * PRICE_OUT


async def test_credits_held_by_a_running_stream_cannot_be_spent_twice(
    aiohttp_server: ServerFactory, quota: MockQuota
) -> None:
    quota.settings.chunk_delay_s = 0.02
    hold = 2 * PRICE_IN + 512 * PRICE_OUT
    quota.set_balance(EMAIL, hold + 10_000)  # one hold fits; two do not
    server = await aiohttp_server(create_app(quota))
    headers = token_for(quota)
    url = server.make_url("/v1/chat/completions")
    async with ClientSession() as session:
        async with session.post(url, json=chat_body(stream=True), headers=headers) as stream:
            await stream.content.readuntil(b"\n\n")
            second = await session.post(url, json=chat_body(), headers=headers)
            assert second.status == 402
            assert (await second.json())["error"]["code"] == "insufficient_credits"
            await stream.read()
        third = await session.post(url, json=chat_body(), headers=headers)
        assert third.status == 200
        assert (await third.json())["quota"]["billing_mode"] == "user"


async def test_chat_beyond_the_balance_is_402_and_charges_nothing(
    http: Http, quota: MockQuota
) -> None:
    quota.set_balance(EMAIL, 1000)
    resp = await http.post(
        "/v1/chat/completions", json=chat_body(stream=True), headers=token_for(quota)
    )
    body = await resp.json()
    assert resp.status == 402
    assert body["error"]["code"] == "insufficient_credits"
    assert body["error"]["type"] == "insufficient_quota"
    assert quota.balance(EMAIL) == 1000
    assert quota.counters["chat.insufficient_credits"] == 1
    assert quota.counters["chat.streamed"] == 0


@pytest.mark.parametrize(
    ("method", "path", "scope", "missing"),
    [
        ("POST", "/v1/chat/completions", "credits.read", "credits.spend"),
        ("GET", "/v1/balance", "credits.spend", "credits.read"),
        ("GET", "/v1/models", "credits.spend", "credits.read"),
    ],
)
async def test_a_token_without_the_route_scope_gets_403_insufficient_scope(
    http: Http, quota: MockQuota, method: str, path: str, scope: str, missing: str
) -> None:
    resp = await http.request(method, path, json=chat_body(), headers=token_for(quota, scope))
    body = await resp.json()
    assert resp.status == 403
    assert body["error"]["code"] == "insufficient_scope"
    assert body["error"]["type"] == "permission_error"
    assert missing in body["error"]["message"]
    assert quota.balance(EMAIL) == quota.settings.default_balance


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "invalid_token"),
        ("Bearer quota_token_unknown", "invalid_token"),
        ("Bearer sk-quota-0123456789abcdef", "invalid_api_key"),
        ("Bearer garbage", "invalid_api_key"),
        ("Basic dXNlcjpwYXNz", "invalid_token"),
    ],
)
async def test_api_calls_without_a_live_token_get_401(
    http: Http, authorization: str | None, code: str
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    resp = await http.post("/v1/chat/completions", json=chat_body(), headers=headers)
    body = await resp.json()
    assert resp.status == 401
    assert body["error"]["code"] == code
    assert body["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"{not json", id="invalid json"),
        pytest.param(b"[]", id="not an object"),
        pytest.param(json.dumps(chat_body(model="gpt-9")).encode(), id="unknown model"),
        pytest.param(json.dumps({"model": "gpt-4o-mini"}).encode(), id="missing messages"),
        pytest.param(json.dumps(chat_body() | {"messages": []}).encode(), id="empty messages"),
        pytest.param(json.dumps(chat_body(max_tokens=0)).encode(), id="zero max_tokens"),
        pytest.param(json.dumps(chat_body(stream="yes")).encode(), id="stream not a boolean"),
    ],
)
async def test_malformed_chat_requests_get_400_invalid_request(
    http: Http, quota: MockQuota, payload: bytes
) -> None:
    headers = {**token_for(quota), "Content-Type": "application/json"}
    resp = await http.post("/v1/chat/completions", data=payload, headers=headers)
    body = await resp.json()
    assert resp.status == 400
    assert body["error"]["code"] == "invalid_request"
    assert body["error"]["type"] == "invalid_request_error"
    assert quota.balance(EMAIL) == quota.settings.default_balance


async def test_chat_accepts_content_parts(http: Http, quota: MockQuota) -> None:
    content = [{"type": "text", "text": "parts work"}, {"type": "image_url", "image_url": {}}]
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": content}]}
    resp = await http.post("/v1/chat/completions", json=body, headers=token_for(quota))
    reply = await resp.json()
    assert reply["choices"][0]["message"]["content"].startswith("Echo from Quota: parts work")
    assert reply["usage"]["prompt_tokens"] == 2


async def test_balance_reports_the_users_wallet(http: Http, quota: MockQuota) -> None:
    quota.set_balance(EMAIL, 1_234_567)
    resp = await http.get("/v1/balance", headers=token_for(quota, "credits.read"))
    body = await resp.json()
    assert body["wallet"] == "oauth_user"
    assert body["balance"] == 1_234_567
    assert body["plan"] == "free"
    assert body["billing_mode"] == "user"
    assert body["user_id"].startswith("usr_")
    assert quota.counters["balance"] == 1


async def test_a_new_wallet_starts_with_the_default_balance(http: Http, quota: MockQuota) -> None:
    quota.settings.default_balance = 42
    resp = await http.get("/v1/balance", headers=token_for(quota))
    assert (await resp.json())["balance"] == 42


async def test_models_lists_priced_models(http: Http, quota: MockQuota) -> None:
    resp = await http.get("/v1/models", headers=token_for(quota, "credits.read"))
    body = await resp.json()
    assert body["object"] == "list"
    models = {m["id"]: m for m in body["data"]}
    assert {"gpt-4o-mini", "gpt-4o", "claude-3-5-haiku"} <= set(models)
    assert models["gpt-4o-mini"]["pricing"] == {"input_per_token": 100, "output_per_token": 400}
    assert all(m["object"] == "model" and m["owned_by"] for m in body["data"])
    assert quota.counters["models"] == 1
