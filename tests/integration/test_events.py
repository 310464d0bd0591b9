"""Host-app events: signed deliveries over real HTTP, retries, a bounded queue, a bounded shutdown.

A receiver (a real aiohttp server standing in for the host app) records every delivery and
answers with the statuses a test scripts; ``gate`` holds its answers until a test opens it.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.demo.hostapp import create_host_app
from sidecar.demo.runner import running_demo
from sidecar.hooks import (
    EVENT_HEADER,
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    EventSink,
    HttpEventSink,
    create_sink,
    forwarded_id,
    sign,
    verify_signature,
)
from sidecar.metrics import Metrics
from tests.integration.conftest import Stack
from tests.support import FakeClock, approve_consent, make_config

SECRET = "events-secret-for-tests-0123456789abcdef"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "EVENTS.md"


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    @property
    def envelope(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    url: str
    deliveries: list[Delivery] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # answered in turn; then 204
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    async def received(self, count: int, *, within_s: float = 5.0) -> list[Delivery]:
        deadline = time.monotonic() + within_s
        while len(self.deliveries) < count:
            assert time.monotonic() < deadline, f"{len(self.deliveries)} of {count} deliveries"
            await asyncio.sleep(0.01)
        return self.deliveries


@pytest.fixture
async def receiver(aiohttp_server: Callable[..., Awaitable[Any]]) -> Receiver:
    app = web.Application()
    state = Receiver(url="")
    state.gate.set()

    async def events(request: web.Request) -> web.Response:
        state.deliveries.append(Delivery(dict(request.headers), await request.read()))
        await state.gate.wait()
        status = state.statuses.pop(0) if state.statuses else 204
        return web.Response(status=status)

    app.router.add_post("/quota/events", events)
    server = await aiohttp_server(app)
    state.url = str(server.make_url("/quota/events"))
    return state


def events_config(url: str, **overrides: Any) -> Any:
    values = {"url": url, "secret": SECRET, "backoff_base_s": 0.01, "backoff_max_s": 0.02}
    return make_config(events={**values, **overrides}).events


@pytest.fixture
async def sink_for(receiver: Receiver) -> AsyncIterator[Callable[..., Awaitable[HttpEventSink]]]:
    """Started sinks delivering to the receiver; each is closed at the end of the test."""
    sinks: list[HttpEventSink] = []

    async def make(**overrides: Any) -> HttpEventSink:
        sink = HttpEventSink(
            events_config(receiver.url, **overrides),
            metrics=Metrics(process=False),
            clock=FakeClock(),
        )
        await sink.start()
        sinks.append(sink)
        return sink

    yield make
    receiver.gate.set()
    for sink in sinks:
        await sink.close()


def deliveries(sink: HttpEventSink, outcome: str) -> float:
    value = sink._metrics.registry.get_sample_value(
        "quota_sidecar_event_deliveries_total", {"outcome": outcome}
    )
    return value or 0.0


# --- the signature ------------------------------------------------------------------------


def test_a_signature_verifies_against_the_raw_body_it_was_made_for() -> None:
    body = b'{"id":"sce_1","type":"sidecar.usage"}'
    header = sign(SECRET, 1_800_000_000, body)
    assert re.fullmatch(r"t=1800000000,v1=[0-9a-f]{64}", header)
    assert verify_signature(SECRET, header, body, now=1_800_000_100)


@pytest.mark.parametrize(
    ("case", "secret", "header_of", "body", "now"),
    [
        ("tampered body", SECRET, lambda h: h, b'{"id":"sce_2"}', 1_800_000_000),
        ("another secret", "x" * 40, lambda h: h, b'{"id":"sce_1"}', 1_800_000_000),
        ("stale", SECRET, lambda h: h, b'{"id":"sce_1"}', 1_800_000_301),
        ("from the future", SECRET, lambda h: h, b'{"id":"sce_1"}', 1_799_999_699),
        ("no header", SECRET, lambda h: None, b'{"id":"sce_1"}', 1_800_000_000),
        ("no v1", SECRET, lambda h: h.split(",")[0], b'{"id":"sce_1"}', 1_800_000_000),
        ("no t", SECRET, lambda h: h.split(",")[1], b'{"id":"sce_1"}', 1_800_000_000),
        ("two t", SECRET, lambda h: "t=1," + h, b'{"id":"sce_1"}', 1_800_000_000),
        ("t not a number", SECRET, lambda h: "t=1e9" + h[12:], b'{"id":"sce_1"}', 1_800_000_000),
        ("part without =", SECRET, lambda h: h + ",junk", b'{"id":"sce_1"}', 1_800_000_000),
        ("empty secret", "", lambda h: h, b'{"id":"sce_1"}', 1_800_000_000),
    ],
)
def test_a_signature_is_refused_when(
    case: str, secret: str, header_of: Callable[[str], str | None], body: bytes, now: float
) -> None:
    header = header_of(sign(SECRET, 1_800_000_000, b'{"id":"sce_1"}'))
    assert not verify_signature(secret, header, body, now=now), case


def test_any_one_of_several_v1_entries_is_enough_for_a_secret_rotation() -> None:
    body = b"{}"
    mine = sign(SECRET, 1_800_000_000, body).split(",")[1]
    header = f"t=1800000000,v1={'0' * 64},{mine}"
    assert verify_signature(SECRET, header, body, now=1_800_000_000)


def test_a_forwarded_quota_event_always_gets_the_same_id() -> None:
    assert forwarded_id("evt_abc") == forwarded_id("evt_abc")
    assert forwarded_id("evt_abc") != forwarded_id("evt_abd")
    assert re.fullmatch(r"sce_[0-9a-f]{24}", forwarded_id("evt_abc"))


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_node_snippet_in_the_docs_verifies_a_real_signature() -> None:
    """docs/EVENTS.md's snippet, run as written: accepts ours, refuses a changed body."""
    text = DOCS.read_text(encoding="utf-8")
    snippet = re.search(r"```js\n(.*?)```", text, re.DOTALL)
    assert snippet is not None
    body = '{"id":"sce_1","type":"balance.low","user":"ada","data":{"balance":1}}'
    header = sign(SECRET, 1_800_000_000, body.encode())
    script = snippet[1] + (
        "const [secret, header, body] = process.argv.slice(-3);\n"
        "console.log(JSON.stringify([\n"
        "  verifyQuotaSidecarEvent(secret, header, Buffer.from(body), 1800000010),\n"
        "  verifyQuotaSidecarEvent(secret, header, Buffer.from(body + ' '), 1800000010),\n"
        "  verifyQuotaSidecarEvent(secret, header, Buffer.from(body), 1800000400),\n"
        "]));\n"
    )
    result = subprocess.run(
        ["node", "-e", script, "--", SECRET, header, body],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(result.stdout) == [True, False, False]


# --- delivery -----------------------------------------------------------------------------


async def test_an_emitted_event_arrives_signed_with_its_type_and_id(
    receiver: Receiver, sink_for: Callable[..., Awaitable[HttpEventSink]]
) -> None:
    sink = await sink_for()
    sink.emit("sidecar.usage", {"credits_used": 7100, "model": "gpt-4o-mini"}, user="ada")
    (delivery,) = await receiver.received(1)
    envelope = delivery.envelope
    assert envelope["type"] == "sidecar.usage"
    assert envelope["user"] == "ada"
    assert envelope["data"] == {"credits_used": 7100, "model": "gpt-4o-mini"}
    assert envelope["created_at"] == 1_800_000_000
    assert re.fullmatch(r"sce_[0-9a-f]{24}", envelope["id"])
    assert delivery.headers[EVENT_HEADER] == "sidecar.usage"
    assert delivery.headers[EVENT_ID_HEADER] == envelope["id"]
    assert delivery.headers["Content-Type"] == "application/json"
    signature = delivery.headers[SIGNATURE_HEADER]
    assert verify_signature(SECRET, signature, delivery.body, now=1_800_000_000)
    assert not verify_signature("another-secret-" + "x" * 32, signature, delivery.body, now=1.8e9)


async def test_a_delivery_answered_500_is_retried_until_the_app_takes_it(
    receiver: Receiver, sink_for: Callable[..., Awaitable[HttpEventSink]]
) -> None:
    receiver.statuses = [500, 503]
    sink = await sink_for()
    sink.emit("sidecar.usage", {"credits_used": 1})
    first, second, third = await receiver.received(3)
    assert first.body == second.body == third.body  # the same event, re-signed each time
    for delivery in (first, second, third):
        assert verify_signature(
            SECRET, delivery.headers[SIGNATURE_HEADER], delivery.body, now=1.8e9
        )
    await sink.close()
    assert (deliveries(sink, "retry"), deliveries(sink, "ok"), deliveries(sink, "failed")) == (
        2,
        1,
        0,
    )


async def test_a_delivery_that_never_succeeds_is_given_up_after_max_attempts(
    receiver: Receiver, sink_for: Callable[..., Awaitable[HttpEventSink]]
) -> None:
    receiver.statuses = [500] * 10
    sink = await sink_for(max_attempts=3)
    sink.emit("sidecar.usage", {})
    await receiver.received(3)
    deadline = time.monotonic() + 5
    while deliveries(sink, "failed") < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await sink.close()
    assert len(receiver.deliveries) == 3
    assert deliveries(sink, "retry") == 2


async def test_an_unreachable_app_is_retried_and_then_given_up() -> None:
    from tests.integration.conftest import free_port

    sink = HttpEventSink(
        events_config(f"http://127.0.0.1:{free_port()}/events", max_attempts=2),
        metrics=Metrics(process=False),
    )
    await sink.start()
    sink.emit("sidecar.usage", {})
    deadline = time.monotonic() + 5
    while deliveries(sink, "failed") < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await sink.close()
    assert deliveries(sink, "retry") == 1


async def test_a_full_queue_drops_new_events_and_emit_never_waits(
    receiver: Receiver, sink_for: Callable[..., Awaitable[HttpEventSink]]
) -> None:
    receiver.gate.clear()  # the app hangs: every worker ends up waiting on it
    sink = await sink_for(queue_size=2)
    for n in range(4):  # one per worker, each taken off the queue and stuck at the app
        sink.emit("sidecar.usage", {"n": n})
        await receiver.received(n + 1)
    for n in range(4, 30):  # synchronous calls: nothing runs in between
        sink.emit("sidecar.usage", {"n": n})
    assert deliveries(sink, "dropped") == 24  # 2 fit in the queue
    receiver.gate.set()
    await receiver.received(6)
    sent = sorted(d.envelope["data"]["n"] for d in receiver.deliveries)
    assert sent == [0, 1, 2, 3, 4, 5]


async def test_shutdown_sends_what_is_queued_first(
    receiver: Receiver, sink_for: Callable[..., Awaitable[HttpEventSink]]
) -> None:
    sink = await sink_for(flush_timeout_s=10)
    for n in range(10):
        sink.emit("sidecar.usage", {"n": n})
    await sink.close()
    assert len(receiver.deliveries) == 10
    assert deliveries(sink, "ok") == 10
    sink.emit("sidecar.usage", {"n": "late"})  # after close: dropped, not sent
    assert deliveries(sink, "dropped") == 1


async def test_shutdown_waits_no_longer_than_the_flush_bound_and_counts_what_is_left(
    receiver: Receiver, sink_for: Callable[..., Awaitable[HttpEventSink]]
) -> None:
    receiver.gate.clear()  # the app never answers
    sink = await sink_for(flush_timeout_s=0.1, queue_size=10)
    for n in range(4):  # one per worker, each stuck at the app
        sink.emit("sidecar.usage", {"n": n})
        await receiver.received(n + 1)
    for n in range(4, 7):
        sink.emit("sidecar.usage", {"n": n})
    # Bounded: a close that waited on the app would hit this limit instead.
    await asyncio.wait_for(sink.close(), timeout=10)
    assert deliveries(sink, "dropped") == 7  # 4 mid-delivery, 3 still queued
    assert deliveries(sink, "ok") == 0


def test_with_no_url_the_sink_is_silent() -> None:
    sink = create_sink(make_config().events, metrics=Metrics(process=False))
    assert type(sink) is EventSink
    assert not sink.enabled
    sink.emit("sidecar.usage", {"n": 1}, user="ada")
    sink.forward({"id": "evt_1", "type": "balance.low", "data": {}})


def test_a_url_without_a_secret_is_refused_by_the_config() -> None:
    from sidecar.config_loader import ConfigError

    with pytest.raises(ConfigError, match=r"events\.secret: required"):
        make_config(events={"url": "http://127.0.0.1:3000/quota/events"})
    with pytest.raises(ConfigError, match=r"events\.secret: must be at least 32"):
        make_config(events={"url": "http://127.0.0.1:3000/quota/events", "secret": "short"})


# --- through the running sidecar ----------------------------------------------------------


@pytest.fixture
def config_overrides(receiver: Receiver) -> dict[str, dict[str, Any]]:
    return {"events": {"url": receiver.url, "secret": SECRET}}


async def test_the_running_sidecar_delivers_through_services_events(
    stack: Stack, receiver: Receiver
) -> None:
    assert stack.services.events.enabled
    stack.services.events.emit("sidecar.usage", {"credits_used": 3}, user="bob")
    (delivery,) = await receiver.received(1)
    header = delivery.headers[SIGNATURE_HEADER]
    assert verify_signature(SECRET, header, delivery.body, now=stack.clock())
    assert delivery.envelope["user"] == "bob"


async def test_a_forwarded_quota_event_names_the_host_user_who_owns_that_quota_account(
    stack: Stack, receiver: Receiver
) -> None:
    await stack.connect("ada", "ada@example.com")
    record = await stack.store.get(stack.user_key("ada"))
    assert record is not None
    assert record.quota_user_id is not None
    quota_event = {
        "id": "evt_" + "1" * 24,
        "type": "balance.low",
        "created_at": 1_799_999_990,
        "data": {"user_id": record.quota_user_id, "balance": 900_000, "threshold": 1_000_000},
    }
    stack.services.events.forward(quota_event)
    stack.services.events.forward({**quota_event, "data": {"user_id": "usr_nobody"}})
    first, second = await receiver.received(2)
    by_user = {d.envelope["data"]["user_id"]: d.envelope for d in (first, second)}
    ours = by_user[record.quota_user_id]
    assert ours["user"] == "ada"
    assert ours["id"] == forwarded_id(quota_event["id"])
    assert ours["type"] == "balance.low"
    assert ours["created_at"] == 1_799_999_990
    assert ours["data"] == quota_event["data"]
    assert by_user["usr_nobody"]["user"] is None


async def test_a_forwarded_event_keeps_the_user_its_caller_already_knew(
    stack: Stack, receiver: Receiver
) -> None:
    """As for ``user.disconnected``: the grant is forgotten before the event goes out."""
    envelope = {"id": "evt_" + "2" * 24, "type": "user.disconnected", "created_at": 1_800_000_000}
    stack.services.events.forward({**envelope, "data": {"user_id": "usr_gone"}}, user="ada")
    (delivery,) = await receiver.received(1)
    assert delivery.envelope["user"] == "ada"


# --- the demo: Quota's webhook → the sidecar → the demo app's events endpoint --------------


async def sign_in_demo(browser: aiohttp.ClientSession, url: str, name: str) -> None:
    resp = await browser.post(f"{url}/login", data={"name": name})
    assert resp.status == 200


async def demo_events(browser: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    async with browser.get(f"{url}/api/events") as resp:
        assert resp.status == 200, await resp.text()
        events: list[dict[str, Any]] = (await resp.json())["events"]
        return events


async def test_the_demo_app_lists_quotas_usage_event_for_the_user_it_concerns() -> None:
    async with running_demo(port=0, quota_port=0, app_port=0, internal_port=0) as demo:
        demo.quota.settings.chunk_delay_s = 0
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as browser:
            await sign_in_demo(browser, demo.url, "ada")
            consent = await browser.get(f"{demo.url}/auth/quota/connect?return_to=/")
            landed = await approve_consent(browser, consent, "ada@quota.local")  # type: ignore[arg-type]
            assert landed.status == 200
            chat = await browser.post(f"{demo.url}/api/chat", json={"message": "hello"})
            assert "data: [DONE]" in await chat.text()

            deadline = time.monotonic() + 5
            while not any(
                e["type"] == "usage.completed" for e in await demo_events(browser, demo.url)
            ):
                assert time.monotonic() < deadline, "usage.completed never reached the demo app"
                await asyncio.sleep(0.05)
            usage = next(
                e for e in await demo_events(browser, demo.url) if e["type"] == "usage.completed"
            )
            assert usage["data"]["credits_used"] > 0
            assert usage["id"].startswith("sce_")

        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
            await sign_in_demo(other, demo.url, "bob")
            assert await demo_events(other, demo.url) == []  # nobody sees another user's events


@pytest.fixture
async def demo_app(aiohttp_client: Callable[..., Awaitable[Any]]) -> Any:
    app = create_host_app(
        internal_url="http://127.0.0.1:9", cookie_secret=b"c" * 32, events_secret=SECRET
    )
    return await aiohttp_client(app)


async def post_event(client: Any, body: bytes, signature: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers[SIGNATURE_HEADER] = signature
    async with client.post("/quota/events", data=body, headers=headers) as resp:
        status: int = resp.status
        return status


async def test_the_demo_app_keeps_a_signed_event_and_refuses_a_forged_one(demo_app: Any) -> None:
    now = int(time.time())
    event = {"id": "sce_1", "type": "balance.low", "created_at": now, "user": "ada", "data": {}}
    body = json.dumps(event).encode()
    assert await post_event(demo_app, body, None) == 401
    assert await post_event(demo_app, body, sign("x" * 40, now, body)) == 401
    assert await post_event(demo_app, body, sign(SECRET, now - 3600, body)) == 401
    forged = json.dumps({**event, "id": "sce_2"}).encode()
    assert await post_event(demo_app, forged, sign(SECRET, now, body)) == 401
    assert await post_event(demo_app, body, sign(SECRET, now, body)) == 204

    await demo_app.post("/login", data={"name": "ada"})
    assert [e["id"] for e in await demo_events(demo_app.session, str(demo_app.make_url("")))] == [
        "sce_1"
    ]


async def test_the_demo_app_has_no_events_endpoint_without_a_secret(
    aiohttp_client: Callable[..., Awaitable[Any]],
) -> None:
    client = await aiohttp_client(create_host_app(internal_url="http://127.0.0.1:9"))
    body = b'{"type":"balance.low"}'
    assert await post_event(client, body, sign(SECRET, int(time.time()), body)) == 404
