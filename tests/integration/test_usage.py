"""Usage read from the emulator's real answers: metrics move by its credits_used, events go out.

Every billed answer the emulator sends carries Quota's ``quota`` block; the sidecar reads it from
a side copy of the chunks. What the client receives is compared with what the metrics say.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from sidecar.hooks import verify_signature
from tests.integration.conftest import Stack
from tests.scrape import scrape, wait_for_value
from tests.support import sse_events

EVENTS_SECRET = "e" * 40
CREDITS = "quota_sidecar_usage_credits_total"
TOKENS = "quota_sidecar_usage_tokens_total"
BILLED = "quota_sidecar_usage_billed_requests_total"
UNREAD = "quota_sidecar_usage_unread_total"


async def _messages(stack: Stack, user: str, *, stream: bool) -> Any:
    return await stack.backend.post(
        f"{stack.internal_url}/v1/messages",
        json={
            "model": "claude-3-5-haiku",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "héllo 日本語 🙂 there"}],
            "stream": stream,
        },
        headers={"X-Quota-User": user},
    )


async def _streamed_payloads(resp: Any) -> list[dict[str, Any]]:
    payloads = []
    async for event in sse_events(resp):
        data = event.rpartition("data: ")[2]
        if data != "[DONE]":
            payloads.append(json.loads(data))
    return payloads


@pytest.mark.parametrize("store_kind", ["memory", "redis"])
async def test_usage_metrics_move_by_the_credits_and_tokens_quota_reported(stack: Stack) -> None:
    await stack.connect("alice")
    balance_before = stack.quota.balance("alice@example.com")

    plain = await (await stack.chat("alice")).json()
    streamed = await _streamed_payloads(await stack.chat("alice", stream=True))
    message = await (await _messages(stack, "alice", stream=False)).json()
    message_events = await _streamed_payloads(await _messages(stack, "alice", stream=True))

    chat_credits = plain["quota"]["credits_used"] + streamed[-1]["quota"]["credits_used"]
    message_credits = message["quota"]["credits_used"] + message_events[-1]["quota"]["credits_used"]
    spent = balance_before - stack.quota.balance("alice@example.com")
    assert chat_credits + message_credits == spent > 0

    scraped = await scrape(stack.admin_url)
    assert scraped.value(CREDITS, endpoint="chat") == chat_credits
    assert scraped.value(CREDITS, endpoint="messages") == message_credits
    assert scraped.value(BILLED, endpoint="chat") == 2
    assert scraped.value(BILLED, endpoint="messages") == 2
    assert scraped.value(UNREAD) == 0
    chat_prompt = plain["usage"]["prompt_tokens"] + streamed[-1]["usage"]["prompt_tokens"]
    chat_completion = (
        plain["usage"]["completion_tokens"] + streamed[-1]["usage"]["completion_tokens"]
    )
    assert scraped.value(TOKENS, endpoint="chat", kind="prompt") == chat_prompt
    assert scraped.value(TOKENS, endpoint="chat", kind="completion") == chat_completion
    start, delta = message_events[0], message_events[-3]
    assert delta["type"] == "message_delta"
    assert scraped.value(TOKENS, endpoint="messages", kind="prompt") == (
        message["usage"]["input_tokens"] + start["message"]["usage"]["input_tokens"]
    )
    assert scraped.value(TOKENS, endpoint="messages", kind="completion") == (
        message["usage"]["output_tokens"] + delta["usage"]["output_tokens"]
    )


async def test_reads_refusals_and_errors_are_not_billed(stack: Stack) -> None:
    await stack.connect("alice")
    models = await stack.backend.get(
        f"{stack.internal_url}/v1/models", headers={"X-Quota-User": "alice"}
    )
    assert models.status == 200
    stack.quota.set_balance("alice@example.com", 0)
    refused = await stack.chat("alice")
    assert refused.status == 402
    scraped = await scrape(stack.admin_url)
    assert scraped.value(BILLED) == 0
    assert scraped.value(CREDITS) == 0


async def test_a_client_leaving_mid_stream_is_counted_as_unread_client_closed(
    stack: Stack,
) -> None:
    await stack.connect("alice")
    stack.quota.settings.chunk_delay_s = 0.2
    resp = await stack.chat("alice", stream=True)
    events = sse_events(resp)
    assert (await anext(events)).startswith("data: ")
    resp.close()
    await wait_for_value(stack.admin_url, UNREAD, 1, endpoint="chat", reason="client_closed")
    assert (await scrape(stack.admin_url)).value(CREDITS) == 0


@dataclass
class Receiver:
    """The host app's events endpoint: records each delivery as it arrived."""

    url: str
    deliveries: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def usage_events(self, count: int, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while True:
            got = [
                json.loads(body)
                for _, body in self.deliveries
                if json.loads(body)["type"] == "sidecar.usage"
            ]
            if len(got) >= count:
                return got
            assert time.monotonic() < deadline, f"{len(got)} usage events, expected {count}"
            await asyncio.sleep(0.02)


@pytest.fixture
async def receiver(aiohttp_server: Callable[..., Any]) -> Receiver:
    deliveries: list[tuple[dict[str, str], bytes]] = []

    async def events(request: web.Request) -> web.Response:
        deliveries.append((dict(request.headers), await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/events", events)
    server = await aiohttp_server(app)
    return Receiver(str(server.make_url("/events")), deliveries)


@pytest.fixture
def config_overrides(receiver: Receiver) -> dict[str, dict[str, Any]]:
    return {"events": {"url": receiver.url, "secret": EVENTS_SECRET}}


async def test_each_call_with_usage_sends_a_signed_sidecar_usage_event_for_the_host_user(
    stack: Stack, receiver: Receiver
) -> None:
    await stack.connect("alice")
    plain = await (await stack.chat("alice")).json()
    streamed = await _streamed_payloads(await _messages(stack, "alice", stream=True))

    chat_event, message_event = sorted(
        await receiver.usage_events(2), key=lambda e: e["data"]["route"]
    )
    assert chat_event["user"] == "alice"
    assert chat_event["data"] == {
        "credits_used": plain["quota"]["credits_used"],
        "balance_after": plain["quota"]["balance_after"],
        "tokens": {
            "prompt": plain["usage"]["prompt_tokens"],
            "completion": plain["usage"]["completion_tokens"],
            "total": plain["usage"]["total_tokens"],
        },
        "route": "chat",
        "model": "gpt-4o-mini",
    }
    quota = streamed[-1]["quota"]
    prompt = streamed[0]["message"]["usage"]["input_tokens"]
    completion = streamed[-3]["usage"]["output_tokens"]
    assert message_event["user"] == "alice"
    assert message_event["data"] == {
        "credits_used": quota["credits_used"],
        "balance_after": quota["balance_after"],
        "tokens": {"prompt": prompt, "completion": completion, "total": prompt + completion},
        "route": "messages",
        "model": "claude-3-5-haiku",
    }
    for headers, body in receiver.deliveries:
        signature = headers.get("X-Quota-Sidecar-Signature")
        assert verify_signature(EVENTS_SECRET, signature, body, now=stack.clock())
