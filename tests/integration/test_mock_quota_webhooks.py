"""The Quota emulator's webhooks: each event at its moment, signed, retried, recorded, replayable.

A real receiver (an aiohttp server on loopback) records every delivery's headers and raw body;
signatures are checked over those raw bytes, as a receiver must.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDictProxy

from sidecar.mock_quota import WEBHOOKS_KEY, MockQuota, create_app
from sidecar.mock_quota.wallets import user_id_for
from tests.support import FakeClock

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
Http = TestClient[Any, Any]

CLIENT_ID = "quota_client_test"
CLIENT_SECRET = "quota_secret_test"
CREDENTIALS = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
REDIRECT_URI = "http://localhost:5180/auth/quota/callback"
EMAIL = "alice@example.com"
SECRET = "whsec_test_0123456789abcdef"
# Generous: a delivery is a loopback POST, retries add at most 1.4 s of backoff.
WAIT_S = 10


@dataclass(frozen=True)
class Received:
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass
class Receiver:
    """A host app's webhook endpoint; answers ``answers`` in order, then 200."""

    url: str = ""
    answers: list[int] = field(default_factory=list)
    got: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    hang: bool = False

    async def handle(self, request: web.Request) -> web.Response:
        self.got.put_nowait(Received(request.headers, await request.read()))
        if self.hang:
            await self.release.wait()
        return web.Response(status=self.answers.pop(0) if self.answers else 200)

    async def next(self) -> Received:
        return await asyncio.wait_for(self.got.get(), WAIT_S)

    async def next_of(self, event_type: str) -> dict[str, Any]:
        """The next delivered event of ``event_type``, its signature checked; others skipped."""
        while True:
            event = verified(await self.next())
            if event["type"] == event_type:
                return event


def verified(received: Received, secret: str = SECRET) -> dict[str, Any]:
    """The event, once its signature proves it was signed with ``secret`` over these bytes."""
    expected = hmac.new(secret.encode(), received.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(received.headers["X-Quota-Signature"], expected)
    assert received.headers["Content-Type"] == "application/json"
    event: dict[str, Any] = json.loads(received.body)
    assert set(event) == {"id", "type", "created_at", "data"}
    return event


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def receiver(aiohttp_server: ServerFactory) -> AsyncIterator[Receiver]:
    hooks = Receiver()
    app = web.Application()
    app.router.add_post("/hooks", hooks.handle)
    server = await aiohttp_server(app)
    hooks.url = str(server.make_url("/hooks"))
    yield hooks
    hooks.release.set()  # a hanging handler must not hold the receiver's shutdown


@pytest.fixture
def quota(clock: FakeClock, receiver: Receiver) -> MockQuota:
    state = MockQuota(clock=clock)
    state.settings.chunk_delay_s = 0
    state.settings.webhook_url = receiver.url
    state.settings.webhook_secret = SECRET
    state.register_client(
        name="Demo",
        redirect_uris=[REDIRECT_URI],
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
    )
    return state


@pytest.fixture
async def http(aiohttp_client: ClientFactory, quota: MockQuota) -> Http:
    return await aiohttp_client(create_app(quota))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def recorded_types(quota_app: Http) -> list[str]:
    """The events the emulator has handed to delivery so far (recorded when they happen)."""
    return [d.type for d in quota_app.app[WEBHOOKS_KEY].deliveries]


async def connect(http: Http, email: str = EMAIL) -> dict[str, Any]:
    """Consent and code exchange, as a browser and a sidecar would do them."""
    verifier = secrets.token_urlsafe(32)
    digest = hashlib.sha256(verifier.encode()).digest()
    challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    form = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "scope": "credits.read credits.spend",
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "email": email,
        "decision": "approve",
    }
    approved = await http.post("/oauth/authorize", data=form, allow_redirects=False)
    code = parse_qs(urlsplit(approved.headers["Location"]).query)["code"][0]
    exchange = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
        **CREDENTIALS,
    }
    resp = await http.post("/oauth/token", data=exchange)
    tokens: dict[str, Any] = await resp.json()
    assert resp.status == 200, tokens
    return tokens


async def chat(http: Http, token: str, **extra: object) -> dict[str, Any]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **extra}
    resp = await http.post("/v1/chat/completions", json=body, headers=bearer(token))
    answer: dict[str, Any] = await resp.json()
    assert resp.status == 200, answer
    return answer


async def test_a_code_exchange_sends_user_connected_with_the_users_quota_id(
    http: Http, receiver: Receiver, clock: FakeClock
) -> None:
    tokens = await connect(http)
    event = await receiver.next_of("user.connected")
    assert re.fullmatch(r"evt_[0-9a-f]{24}", event["id"])
    assert event["created_at"] == int(clock())
    assert event["data"] == {
        "user_id": user_id_for(EMAIL),
        "client_id": CLIENT_ID,
        "scope": "credits.read credits.spend",
    }
    userinfo = await http.get("/oauth/userinfo", headers=bearer(tokens["access_token"]))
    balance = await http.get("/v1/balance", headers=bearer(tokens["access_token"]))
    assert (await userinfo.json())["sub"] == event["data"]["user_id"]
    assert (await balance.json())["user_id"] == event["data"]["user_id"]


async def test_revoking_a_refresh_token_sends_user_disconnected_and_an_access_token_does_not(
    http: Http, quota: MockQuota, receiver: Receiver
) -> None:
    tokens = quota.issue_grant(CLIENT_ID, EMAIL)
    resp = await http.post("/oauth/revoke", data={"token": tokens["access_token"], **CREDENTIALS})
    assert resp.status == 200
    assert recorded_types(http) == []

    resp = await http.post("/oauth/revoke", data={"token": tokens["refresh_token"], **CREDENTIALS})
    assert resp.status == 200
    event = await receiver.next_of("user.disconnected")
    assert event["data"] == {"user_id": user_id_for(EMAIL), "client_id": CLIENT_ID}
    again = await http.post("/oauth/revoke", data={"token": tokens["refresh_token"], **CREDENTIALS})
    assert again.status == 200
    assert recorded_types(http) == ["user.disconnected"], "an already revoked grant says nothing"


async def test_a_dashboard_disconnect_revokes_every_grant_of_the_user_and_says_so(
    http: Http, quota: MockQuota, receiver: Receiver
) -> None:
    other = quota.register_client(name="Other", redirect_uris=["https://other.example/cb"])
    alice = quota.issue_grant(CLIENT_ID, EMAIL)
    quota.issue_grant(other.client_id, EMAIL)
    bob = quota.issue_grant(CLIENT_ID, "bob@example.com")
    user_id = user_id_for(EMAIL)

    resp = await http.post(f"/_mock/users/{user_id}/disconnect")
    body = await resp.json()
    assert resp.status == 200, body
    assert body == {
        "user_id": user_id,
        "clients": [CLIENT_ID, other.client_id],
        "revoked_grants": 2,
    }

    refresh = {"grant_type": "refresh_token", "refresh_token": alice["refresh_token"]}
    refused = await http.post("/oauth/token", data={**refresh, **CREDENTIALS})
    assert refused.status == 400
    assert (await refused.json())["error"] == "invalid_grant"
    assert (await http.get("/v1/balance", headers=bearer(alice["access_token"]))).status == 401
    still = {"grant_type": "refresh_token", "refresh_token": bob["refresh_token"]}
    assert (await http.post("/oauth/token", data={**still, **CREDENTIALS})).status == 200

    first = await receiver.next_of("user.disconnected")
    second = await receiver.next_of("user.disconnected")
    assert sorted([first["data"]["client_id"], second["data"]["client_id"]]) == sorted(
        [CLIENT_ID, other.client_id]
    )
    assert {first["data"]["user_id"], second["data"]["user_id"]} == {user_id}


async def test_a_dashboard_disconnect_of_an_unknown_user_is_404(http: Http) -> None:
    resp = await http.post("/_mock/users/usr_nobody/disconnect")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "unknown_user"
    assert recorded_types(http) == []


async def test_setting_a_wallet_sends_balance_updated(http: Http, receiver: Receiver) -> None:
    resp = await http.put(f"/_mock/wallets/{EMAIL}", json={"balance": 1234})
    assert resp.status == 200
    event = await receiver.next_of("balance.updated")
    assert event["data"] == {"user_id": user_id_for(EMAIL), "balance": 1234}


async def test_paying_a_checkout_sends_balance_updated_with_the_new_balance(
    http: Http, quota: MockQuota, receiver: Receiver
) -> None:
    quota.set_balance(EMAIL, 100)
    tokens = quota.issue_grant(CLIENT_ID, EMAIL)
    body = {
        "package_id": "pkg_starter",
        "success_url": "https://app.example/ok",
        "cancel_url": "https://app.example/no",
    }
    created = await http.post(
        "/api/payments/checkout", json=body, headers=bearer(tokens["access_token"])
    )
    checkout = await created.json()
    await http.post(f"/checkout/{checkout['id']}/pay", allow_redirects=False)
    event = await receiver.next_of("balance.updated")
    assert event["data"] == {"user_id": user_id_for(EMAIL), "balance": 100 + 5_000_000}


async def _chat_plain(http: Http, token: str) -> int:
    return int((await chat(http, token))["quota"]["credits_used"])


async def _chat_stream(http: Http, token: str) -> int:
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    resp = await http.post("/v1/chat/completions", json=body, headers=bearer(token))
    events = [e for e in (await resp.text()).split("\n\n") if e.startswith("data: {")]
    return int(json.loads(events[-1][len("data: ") :])["quota"]["credits_used"])


def _messages_body(stream: bool) -> dict[str, object]:
    return {
        "model": "gpt-4o-mini",
        "max_tokens": 64,
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
    }


async def _messages_plain(http: Http, token: str) -> int:
    resp = await http.post("/v1/messages", json=_messages_body(False), headers=bearer(token))
    return int((await resp.json())["quota"]["credits_used"])


async def _messages_stream(http: Http, token: str) -> int:
    resp = await http.post("/v1/messages", json=_messages_body(True), headers=bearer(token))
    last = (await resp.text()).strip().split("\n\n")[-1]
    assert last.startswith("event: quota_usage\n")
    return int(json.loads(last.split("data: ", 1)[1])["quota"]["credits_used"])


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(_chat_plain, id="chat"),
        pytest.param(_chat_stream, id="chat stream"),
        pytest.param(_messages_plain, id="messages"),
        pytest.param(_messages_stream, id="messages stream"),
    ],
)
async def test_each_billed_call_sends_usage_completed_with_what_it_charged(
    http: Http,
    quota: MockQuota,
    receiver: Receiver,
    call: Callable[[Http, str], Awaitable[int]],
) -> None:
    quota.set_balance(EMAIL, 3_000_000)
    tokens = quota.issue_grant(CLIENT_ID, EMAIL)
    credits_used = await call(http, tokens["access_token"])
    event = await receiver.next_of("usage.completed")
    assert credits_used > 0
    assert event["data"] == {
        "user_id": user_id_for(EMAIL),
        "credits_used": credits_used,
        "balance_after": 3_000_000 - credits_used,
        "model": "gpt-4o-mini",
    }
    assert recorded_types(http) == ["usage.completed"]


async def test_a_stream_cut_off_by_the_client_still_reports_the_usage_it_billed(
    http: Http, quota: MockQuota, receiver: Receiver
) -> None:
    quota.set_balance(EMAIL, 3_000_000)
    quota.settings.chunk_delay_s = 0.05
    tokens = quota.issue_grant(CLIENT_ID, EMAIL)
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    resp = await http.post(
        "/v1/chat/completions", json=body, headers=bearer(tokens["access_token"])
    )
    await resp.content.readuntil(b"\n\n")
    resp.close()
    event = await receiver.next_of("usage.completed")
    assert event["data"]["credits_used"] > 0
    assert event["data"]["balance_after"] == quota.balance(EMAIL)
    assert event["data"]["balance_after"] == 3_000_000 - event["data"]["credits_used"]
    assert quota.counters["chat.stream_aborted"] == 1


async def test_balance_low_is_sent_only_when_a_spend_crosses_the_threshold(
    http: Http, quota: MockQuota, receiver: Receiver
) -> None:
    quota.set_balance(EMAIL, 2_000_000)
    token = quota.issue_grant(CLIENT_ID, EMAIL)["access_token"]
    first = (await chat(http, token))["quota"]
    cost = first["credits_used"]
    # The next call (same cost) ends below the threshold; the one after starts below it.
    threshold = first["balance_after"] - cost // 2
    patched = await http.patch("/_mock/settings", json={"low_balance_threshold": threshold})
    assert patched.status == 200
    assert "balance.low" not in recorded_types(http)

    second = (await chat(http, token))["quota"]
    event = await receiver.next_of("balance.low")
    assert event["data"] == {
        "user_id": user_id_for(EMAIL),
        "balance": second["balance_after"],
        "threshold": threshold,
    }
    await chat(http, token)
    assert recorded_types(http).count("balance.low") == 1
    assert recorded_types(http).count("usage.completed") == 3


async def test_a_spend_from_exactly_the_threshold_counts_as_crossing(
    http: Http, quota: MockQuota, receiver: Receiver
) -> None:
    quota.set_balance(EMAIL, 1_000_000)  # the default threshold
    token = quota.issue_grant(CLIENT_ID, EMAIL)["access_token"]
    await chat(http, token)
    event = await receiver.next_of("balance.low")
    assert event["data"]["threshold"] == 1_000_000


async def test_a_failing_receiver_gets_the_same_signed_event_again_until_it_answers_2xx(
    http: Http, receiver: Receiver
) -> None:
    receiver.answers = [500, 503]
    await http.put(f"/_mock/wallets/{EMAIL}", json={"balance": 5})
    attempts = [await receiver.next() for _ in range(3)]
    assert len({a.body for a in attempts}) == 1
    assert len({a.headers["X-Quota-Signature"] for a in attempts}) == 1
    verified(attempts[0])

    deliveries = await wait_until_done(http)
    assert deliveries[0]["attempts"] == 3
    assert deliveries[0]["status"] == 200
    assert deliveries[0]["error"] is None
    assert deliveries[0]["body"] == json.loads(attempts[0].body)


async def test_the_emulator_gives_up_after_three_retries(
    http: Http, quota: MockQuota, receiver: Receiver
) -> None:
    receiver.answers = [500] * 10
    await http.put(f"/_mock/wallets/{EMAIL}", json={"balance": 5})
    deliveries = await wait_until_done(http)
    assert (deliveries[0]["attempts"], deliveries[0]["status"]) == (4, 500)
    assert deliveries[0]["error"] == "HTTP 500"
    assert receiver.got.qsize() == 4
    assert quota.counters["webhooks.failed"] == 1


async def test_an_unreachable_receiver_is_retried_and_recorded_without_a_status(
    http: Http, quota: MockQuota, unused_tcp_port: int
) -> None:
    quota.settings.webhook_url = f"http://127.0.0.1:{unused_tcp_port}/hooks"
    await http.put(f"/_mock/wallets/{EMAIL}", json={"balance": 5})
    deliveries = await wait_until_done(http)
    assert deliveries[0]["attempts"] == 4
    assert deliveries[0]["status"] is None
    assert deliveries[0]["error"]


async def wait_until_done(http: Http) -> list[dict[str, Any]]:
    async def poll() -> list[dict[str, Any]]:
        while True:
            deliveries: list[dict[str, Any]] = await (await http.get("/_mock/webhooks")).json()
            if deliveries and all(d["done"] for d in deliveries):
                return deliveries
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(poll(), WAIT_S)


async def test_nothing_is_sent_while_webhook_url_is_unset(
    http: Http, quota: MockQuota, receiver: Receiver
) -> None:
    quota.settings.webhook_url = None
    await http.put(f"/_mock/wallets/{EMAIL}", json={"balance": 1})
    await connect(http)
    assert await (await http.get("/_mock/webhooks")).json() == []
    assert quota.counters["webhooks.skipped"] == 2

    await http.patch("/_mock/settings", json={"webhook_url": receiver.url})
    await http.put(f"/_mock/wallets/{EMAIL}", json={"balance": 2})
    event = verified(await receiver.next())
    assert (event["type"], event["data"]["balance"]) == ("balance.updated", 2)
    assert recorded_types(http) == ["balance.updated"]


async def test_the_signature_follows_the_secret_in_the_settings(
    http: Http, receiver: Receiver
) -> None:
    await http.patch("/_mock/settings", json={"webhook_secret": "whsec_rotated"})
    await http.put(f"/_mock/wallets/{EMAIL}", json={"balance": 3})
    received = await receiver.next()
    verified(received, "whsec_rotated")
    with pytest.raises(AssertionError):
        verified(received, SECRET)


async def test_send_delivers_an_arbitrary_event_and_can_repeat_its_id(
    http: Http, receiver: Receiver
) -> None:
    event = {
        "type": "balance.low",
        "id": "evt_replayed",
        "created_at": 1,
        "data": {"user_id": "usr_x", "balance": 5, "threshold": 10},
    }
    for _ in range(2):
        resp = await http.post("/_mock/webhooks/send", json=event)
        assert resp.status == 202
        assert (await resp.json())["id"] == "evt_replayed"
    first, second = verified(await receiver.next()), verified(await receiver.next())
    assert first == second == event


async def test_send_fills_in_a_fresh_id_and_the_current_time(
    http: Http, receiver: Receiver, clock: FakeClock
) -> None:
    resp = await http.post("/_mock/webhooks/send", json={"type": "user.connected"})
    assert resp.status == 202
    event = verified(await receiver.next())
    assert re.fullmatch(r"evt_[0-9a-f]{24}", event["id"])
    assert (event["created_at"], event["data"]) == (int(clock()), {})


@pytest.mark.parametrize(
    "body",
    [
        {"data": {}},
        {"type": "", "data": {}},
        {"type": "x", "data": []},
        {"type": "x", "id": 5},
        {"type": "x", "created_at": "yesterday"},
    ],
)
async def test_send_refuses_a_malformed_event(http: Http, body: dict[str, object]) -> None:
    resp = await http.post("/_mock/webhooks/send", json=body)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_request"
    assert recorded_types(http) == []


async def test_send_without_a_webhook_url_is_409(http: Http, quota: MockQuota) -> None:
    quota.settings.webhook_url = None
    resp = await http.post("/_mock/webhooks/send", json={"type": "user.connected"})
    assert resp.status == 409
    assert (await resp.json())["error"]["code"] == "webhooks_not_configured"


async def test_reset_forgets_the_recorded_deliveries(http: Http, receiver: Receiver) -> None:
    await http.put(f"/_mock/wallets/{EMAIL}", json={"balance": 3})
    await receiver.next()
    assert await (await http.get("/_mock/webhooks")).json() != []
    await http.post("/_mock/reset")
    assert await (await http.get("/_mock/webhooks")).json() == []


async def test_stopping_the_emulator_ends_pending_deliveries(
    aiohttp_client: ClientFactory, quota: MockQuota, receiver: Receiver
) -> None:
    receiver.hang = True
    http = await aiohttp_client(create_app(quota))
    sender = http.app[WEBHOOKS_KEY]
    await http.put(f"/_mock/wallets/{EMAIL}", json={"balance": 3})
    await receiver.next()  # the delivery is under way and its receiver is not answering
    assert sender.pending == 1
    await http.close()
    assert sender.pending == 0
    assert not sender.deliveries[0].done
    assert sender.emit("balance.updated", {}) is None, "a stopped sender sends nothing"


async def test_revoking_a_grant_a_reconnect_replaced_does_not_say_the_user_disconnected(
    http: Http, quota: MockQuota, receiver: Receiver
) -> None:
    old = quota.issue_grant(CLIENT_ID, EMAIL)
    new = quota.issue_grant(CLIENT_ID, EMAIL)  # the user connected again
    resp = await http.post("/oauth/revoke", data={"token": old["refresh_token"], **CREDENTIALS})
    assert resp.status == 200
    assert recorded_types(http) == [], "the user is still connected through the new grant"
    resp = await http.post("/oauth/revoke", data={"token": new["refresh_token"], **CREDENTIALS})
    assert resp.status == 200
    event = await receiver.next_of("user.disconnected")
    assert event["data"] == {"user_id": user_id_for(EMAIL), "client_id": CLIENT_ID}
