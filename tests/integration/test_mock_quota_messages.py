"""The Quota emulator's Anthropic-compatible ``/v1/messages``: shape, SSE events, billing, errors."""

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
MODEL = "claude-3-5-haiku"
# claude-3-5-haiku prices, in credits per token.
PRICE_IN, PRICE_OUT = 200, 800
EVENT_ORDER = [
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "quota_usage",
]


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


def messages_body(text: str = "hello claude", **extra: object) -> dict[str, object]:
    return {
        "model": MODEL,
        "max_tokens": 256,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def parse_named_events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    """``[(event name, data)]`` from an SSE body made only of ``event:`` + ``data:`` pairs."""
    assert raw.endswith("\n\n")
    events = []
    for block in raw[:-2].split("\n\n"):
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ")
        assert data_line.startswith("data: ")
        events.append((name_line[len("event: ") :], json.loads(data_line[len("data: ") :])))
    return events


def collapsed(names: list[str]) -> list[str]:
    """The event names with runs of the same name folded into one."""
    return [name for i, name in enumerate(names) if i == 0 or names[i - 1] != name]


async def test_messages_answer_in_anthropic_shape_and_charge_exactly_credits_used(
    http: Http, quota: MockQuota
) -> None:
    quota.set_balance(EMAIL, 1_000_000)
    resp = await http.post(
        "/v1/messages", json=messages_body("say hello to the demo"), headers=token_for(quota)
    )
    body = await resp.json()
    assert resp.status == 200, body
    assert body["id"].startswith("msg_")
    assert body["type"] == "message"
    assert body["role"] == "assistant"
    assert body["model"] == MODEL
    assert body["stop_reason"] == "end_turn"
    [block] = body["content"]
    assert block["type"] == "text"
    assert block["text"].startswith("Echo from Quota: say hello to the demo")
    words = len(block["text"].split())
    assert body["usage"] == {"input_tokens": 5, "output_tokens": words}
    cost = 5 * PRICE_IN + words * PRICE_OUT
    assert body["quota"] == {
        "credits_used": cost,
        "balance_before": 1_000_000,
        "balance_after": 1_000_000 - cost,
        "billing_mode": "user",
    }
    assert quota.balance(EMAIL) == 1_000_000 - cost
    assert quota.counters["messages"] == 1


async def test_messages_count_the_system_prompt_and_content_blocks_as_input(
    http: Http, quota: MockQuota
) -> None:
    content = [{"type": "text", "text": "blocks work"}, {"type": "image", "source": {}}]
    body = messages_body(system=[{"type": "text", "text": "be very brief"}])
    body["messages"] = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": content},
    ]
    resp = await http.post("/v1/messages", json=body, headers=token_for(quota))
    reply = await resp.json()
    assert reply["content"][0]["text"].startswith("Echo from Quota: blocks work")
    assert reply["usage"]["input_tokens"] == 3 + 2 + 2 + 2


async def test_messages_stop_at_max_tokens_with_stop_reason_max_tokens(
    http: Http, quota: MockQuota
) -> None:
    resp = await http.post(
        "/v1/messages", json=messages_body(max_tokens=3), headers=token_for(quota)
    )
    body = await resp.json()
    assert body["content"][0]["text"] == "Echo from Quota:"
    assert body["stop_reason"] == "max_tokens"
    assert body["usage"]["output_tokens"] == 3


async def test_messages_stream_sends_anthropic_events_then_quota_usage(
    http: Http, quota: MockQuota
) -> None:
    quota.set_balance(EMAIL, 1_000_000)
    resp = await http.post(
        "/v1/messages", json=messages_body(stream=True), headers=token_for(quota)
    )
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    events = parse_named_events(await resp.text())

    assert collapsed([name for name, _ in events]) == EVENT_ORDER
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_")
    assert (start["type"], start["role"], start["model"]) == ("message", "assistant", MODEL)
    assert start["content"] == []
    assert start["usage"] == {"input_tokens": 2, "output_tokens": 0}
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}

    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert all(delta["type"] == "text_delta" for delta in deltas)
    text = "".join(delta["text"] for delta in deltas)
    assert text.startswith("Echo from Quota: hello claude.")
    words = len(text.split())
    assert len(deltas) == words

    message_delta = next(data for name, data in events if name == "message_delta")
    assert message_delta["delta"]["stop_reason"] == "end_turn"
    assert message_delta["usage"] == {"output_tokens": words}
    cost = 2 * PRICE_IN + words * PRICE_OUT
    assert events[-1][1]["quota"] == {
        "credits_used": cost,
        "balance_before": 1_000_000,
        "balance_after": 1_000_000 - cost,
        "billing_mode": "user",
    }
    assert quota.balance(EMAIL) == 1_000_000 - cost
    assert quota.counters["messages.streamed"] == 1


async def test_messages_stream_sends_each_word_as_it_is_written(
    aiohttp_server: ServerFactory, quota: MockQuota
) -> None:
    quota.settings.chunk_delay_s = 0.05
    server = await aiohttp_server(create_app(quota))
    arrivals: list[float] = []
    async with (
        ClientSession() as session,
        session.post(
            server.make_url("/v1/messages"),
            json=messages_body(stream=True),
            headers=token_for(quota),
        ) as resp,
    ):
        async for _ in resp.content.iter_any():
            arrivals.append(time.monotonic())
    assert len(arrivals) >= 5, "events must reach the client separately"
    assert arrivals[-1] - arrivals[0] >= 0.05 * 5


async def test_a_messages_stream_cut_short_is_charged_only_for_what_was_sent(
    aiohttp_server: ServerFactory, quota: MockQuota
) -> None:
    quota.settings.chunk_delay_s = 0.05
    quota.set_balance(EMAIL, 1_000_000)
    server = await aiohttp_server(create_app(quota))
    async with ClientSession() as session:
        resp = await session.post(
            server.make_url("/v1/messages"),
            json=messages_body(stream=True),
            headers=token_for(quota),
        )
        for _ in range(3):  # message_start, content_block_start, the first word
            await resp.content.readuntil(b"\n\n")
        resp.close()
    for _ in range(100):
        if quota.counters["messages.stream_aborted"]:
            break
        await asyncio.sleep(0.02)
    assert quota.counters["messages.stream_aborted"] == 1
    spent = 1_000_000 - quota.balance(EMAIL)
    assert 2 * PRICE_IN + PRICE_OUT <= spent < 2 * PRICE_IN + 10 * PRICE_OUT


async def test_messages_beyond_the_balance_are_402_before_any_output_and_charge_nothing(
    http: Http, quota: MockQuota
) -> None:
    quota.set_balance(EMAIL, 1000)
    resp = await http.post(
        "/v1/messages", json=messages_body(stream=True), headers=token_for(quota)
    )
    body = await resp.json()
    assert resp.status == 402
    assert body["type"] == "error"
    assert body["error"]["code"] == "insufficient_credits"
    assert body["error"]["type"] == "insufficient_quota"
    assert quota.balance(EMAIL) == 1000
    assert quota.counters["messages.streamed"] == 0


async def test_messages_need_the_credits_spend_scope(http: Http, quota: MockQuota) -> None:
    resp = await http.post(
        "/v1/messages", json=messages_body(), headers=token_for(quota, "credits.read")
    )
    body = await resp.json()
    assert resp.status == 403
    assert body["error"]["code"] == "insufficient_scope"
    assert body["error"]["type"] == "permission_error"
    assert quota.balance(EMAIL) == quota.settings.default_balance


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "invalid_token"),
        ("Bearer quota_token_unknown", "invalid_token"),
        ("Bearer sk-quota-0123456789abcdef", "invalid_api_key"),
    ],
)
async def test_messages_without_a_live_token_get_401(
    http: Http, authorization: str | None, code: str
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    resp = await http.post("/v1/messages", json=messages_body(), headers=headers)
    body = await resp.json()
    assert resp.status == 401
    assert body["type"] == "error"
    assert body["error"]["code"] == code
    assert body["error"]["type"] == "authentication_error"
    assert "WWW-Authenticate" in resp.headers


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"{not json", id="invalid json"),
        pytest.param(b"[]", id="not an object"),
        pytest.param(json.dumps(messages_body(model="claude-9")).encode(), id="unknown model"),
        pytest.param(
            json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode(),
            id="missing max_tokens",
        ),
        pytest.param(json.dumps(messages_body(max_tokens=0)).encode(), id="zero max_tokens"),
        pytest.param(json.dumps(messages_body() | {"messages": []}).encode(), id="no messages"),
        pytest.param(
            json.dumps(
                messages_body() | {"messages": [{"role": "system", "content": "x"}]}
            ).encode(),
            id="system role in messages",
        ),
        pytest.param(json.dumps(messages_body(system=42)).encode(), id="system not text"),
        pytest.param(json.dumps(messages_body(stream="yes")).encode(), id="stream not a boolean"),
    ],
)
async def test_malformed_messages_requests_get_400_invalid_request(
    http: Http, quota: MockQuota, payload: bytes
) -> None:
    headers = {**token_for(quota), "Content-Type": "application/json"}
    resp = await http.post("/v1/messages", data=payload, headers=headers)
    body = await resp.json()
    assert resp.status == 400
    assert body["type"] == "error"
    assert body["error"]["code"] == "invalid_request"
    assert body["error"]["type"] == "invalid_request_error"
    assert quota.balance(EMAIL) == quota.settings.default_balance
