"""Quota's webhooks at POST /auth/quota/webhook: verified, fresh, once; disconnects on every replica.

One test per threat: each forged, altered, stale, future, replayed or oversized delivery is
refused with its code, and the grant it names is still there afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from sidecar.mock_quota.wallets import user_id_for
from sidecar.routes.webhook import MAX_BODY_BYTES
from tests.integration.conftest import Stack
from tests.integration.sidecars import Running, another_sidecar

SECRET = "whsec_test_secret_for_the_webhook_receiver"
WEBHOOKS = {"webhooks": {"secret": SECRET}}
WAIT_S = 5.0


@pytest.fixture
def config_overrides() -> dict[str, dict[str, Any]]:
    return WEBHOOKS


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def event(stack: Stack, event_type: str, data: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "id": fields.get("id", "evt_" + hashlib.sha256(repr(data).encode()).hexdigest()[:24]),
        "type": event_type,
        "created_at": fields.get("created_at", int(stack.clock())),
        "data": data,
    }


def disconnected(stack: Stack, email: str, **fields: Any) -> dict[str, Any]:
    data = {"user_id": user_id_for(email), "client_id": stack.client.client_id}
    return event(stack, "user.disconnected", data, **fields)


async def deliver(
    stack: Stack,
    envelope: dict[str, Any] | bytes,
    *,
    url: str | None = None,
    signature: str | None = "sign",
    **headers: str,
) -> aiohttp.ClientResponse:
    body = envelope if isinstance(envelope, bytes) else json.dumps(envelope).encode()
    sent = {"Content-Type": "application/json", **headers}
    if signature == "sign":
        sent["X-Quota-Signature"] = sign(body)
    elif signature is not None:
        sent["X-Quota-Signature"] = signature
    async with aiohttp.ClientSession() as quota:  # Quota: no cookies, no browser
        resp = await quota.post(
            f"{url or stack.public_url}/auth/quota/webhook", data=body, headers=sent
        )
        await resp.read()
        return resp


async def refused(resp: aiohttp.ClientResponse, status: int, code: str) -> None:
    assert resp.status == status
    assert (await resp.json())["error"]["code"] == code


async def still_connected(stack: Stack, user: str = "alice") -> bool:
    return await stack.store.get(stack.user_key(user)) is not None


async def test_a_signed_fresh_event_is_accepted(stack: Stack) -> None:
    await stack.connect("alice")
    probes = stack.upstream.probe_calls
    envelope = event(stack, "balance.updated", {"user_id": user_id_for("alice@example.com")})
    resp = await deliver(stack, envelope, Origin="https://elsewhere.example")
    assert resp.status == 200
    assert await resp.json() == {"received": True, "id": envelope["id"], "type": "balance.updated"}
    assert stack.upstream.probe_calls == probes  # no identity probe, no Origin check
    assert await still_connected(stack)


async def test_user_disconnected_forgets_that_quota_user_and_no_one_else(stack: Stack) -> None:
    await stack.connect("alice")
    await stack.connect("alice-work", email="alice@example.com")  # same Quota account
    await stack.connect("bob")
    stack.quota.grants.revoke_user(user_id_for("alice@example.com"))  # what Quota did first
    resp = await deliver(stack, disconnected(stack, "alice@example.com"))
    assert resp.status == 200
    assert (await resp.json())["disconnected"] == 2
    assert not await still_connected(stack, "alice")
    assert not await still_connected(stack, "alice-work")
    assert await still_connected(stack, "bob")
    assert stack.quota.counters["revoke"] == 0  # Quota revoked it already
    registry = stack.services.metrics.registry
    counted = registry.get_sample_value(
        "quota_sidecar_wallets_disconnected_total", {"reason": "webhook"}
    )
    received = registry.get_sample_value(
        "quota_sidecar_webhooks_received_total",
        {"type": "user.disconnected", "outcome": "accepted"},
    )
    assert (counted, received) == (2, 1)


async def test_a_disconnect_announced_for_an_older_grant_keeps_the_one_that_works(
    stack: Stack,
) -> None:
    """Alice reconnected; Quota then announces that her old grant is gone. The grant the
    sidecar holds still works at Quota, so it stays: forgetting it would disconnect her."""
    await stack.connect("alice")
    resp = await deliver(stack, disconnected(stack, "alice@example.com"))
    assert resp.status == 200
    assert (await resp.json())["disconnected"] == 0
    assert await still_connected(stack, "alice")
    assert (await stack.chat("alice")).status == 200


async def test_a_wrong_signature_is_refused_and_deletes_nothing(stack: Stack) -> None:
    await stack.connect("alice")
    envelope = disconnected(stack, "alice@example.com")
    wrong = sign(json.dumps(envelope).encode(), "whsec_someone_elses_secret")
    await refused(await deliver(stack, envelope, signature=wrong), 401, "webhook_signature_invalid")
    assert await still_connected(stack)
    counted = stack.services.metrics.registry.get_sample_value(
        "quota_sidecar_webhooks_received_total", {"type": "other", "outcome": "signature_invalid"}
    )
    assert counted == 1


async def test_a_missing_signature_is_refused_and_deletes_nothing(stack: Stack) -> None:
    await stack.connect("alice")
    envelope = disconnected(stack, "alice@example.com")
    await refused(await deliver(stack, envelope, signature=None), 401, "webhook_signature_invalid")
    assert await still_connected(stack)


async def test_a_body_altered_after_signing_is_refused_and_deletes_nothing(stack: Stack) -> None:
    await stack.connect("alice")
    await stack.connect("bob")
    signed = json.dumps(disconnected(stack, "bob@example.com")).encode()
    altered = signed.replace(
        user_id_for("bob@example.com").encode(), user_id_for("alice@example.com").encode()
    )
    resp = await deliver(stack, altered, signature=sign(signed))
    await refused(resp, 401, "webhook_signature_invalid")
    assert await still_connected(stack, "alice")
    assert await still_connected(stack, "bob")


async def test_a_stale_event_is_refused_and_deletes_nothing(stack: Stack) -> None:
    await stack.connect("alice")
    old = int(stack.clock()) - stack.config.webhooks.max_age_s - 1
    envelope = disconnected(stack, "alice@example.com", created_at=old)
    await refused(await deliver(stack, envelope), 400, "webhook_stale")
    assert await still_connected(stack)


async def test_an_event_from_the_future_is_refused_and_deletes_nothing(stack: Stack) -> None:
    await stack.connect("alice")
    envelope = disconnected(stack, "alice@example.com", created_at=int(stack.clock()) + 61)
    await refused(await deliver(stack, envelope), 400, "webhook_stale")
    assert await still_connected(stack)


async def test_a_replayed_event_id_is_refused_and_deletes_nothing(stack: Stack) -> None:
    await stack.connect("alice")
    first = event(stack, "balance.low", {"user_id": "usr_x"}, id="evt_" + "a" * 24)
    assert (await deliver(stack, first)).status == 200
    replay = disconnected(stack, "alice@example.com", id=first["id"])
    await refused(await deliver(stack, replay), 409, "webhook_replayed")
    assert await still_connected(stack)


async def test_an_oversized_body_is_refused_and_deletes_nothing(stack: Stack) -> None:
    await stack.connect("alice")
    envelope = disconnected(stack, "alice@example.com")
    envelope["data"]["padding"] = "x" * MAX_BODY_BYTES
    await refused(await deliver(stack, envelope), 413, "payload_too_large")
    assert await still_connected(stack)


async def test_a_signed_body_that_is_not_an_event_is_400(stack: Stack) -> None:
    for body in (b"[1, 2]", b"not json", json.dumps({"id": "nope", "type": "x"}).encode()):
        await refused(await deliver(stack, body), 400, "invalid_request")


async def test_an_event_for_another_oauth_client_is_acknowledged_and_ignored(
    stack: Stack,
) -> None:
    await stack.connect("alice")
    envelope = disconnected(stack, "alice@example.com")
    envelope["data"]["client_id"] = "quota_client_another_app"
    resp = await deliver(stack, envelope)
    assert resp.status == 200
    assert (await resp.json())["ignored"] is True
    assert await still_connected(stack)


@pytest.mark.parametrize("config_overrides", [{}])
async def test_without_a_secret_the_webhook_is_404_webhooks_not_configured(stack: Stack) -> None:
    envelope = event(stack, "balance.low", {"user_id": "usr_x"})
    await refused(await deliver(stack, envelope), 404, "webhooks_not_configured")


async def test_the_webhook_is_post_only(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.get(f"{stack.public_url}/auth/quota/webhook")
        await refused(resp, 405, "method_not_allowed")


# --- across replicas, and from the emulator --------------------------------------------------------


@pytest.fixture
async def replica(stack: Stack, redis_url: str) -> AsyncIterator[Running]:
    """A second sidecar sharing the stack's Redis prefix: another replica of the same app."""
    async with another_sidecar(stack, store_spec=redis_url, same_app=True, **WEBHOOKS) as running:
        yield running


async def test_user_disconnected_received_by_one_replica_disconnects_on_every_replica(
    stack: Stack, replica: Running
) -> None:
    await stack.connect("alice")
    await stack.connect("bob")
    assert (await stack.chat("alice")).status == 200
    stack.quota.grants.revoke_user(user_id_for("alice@example.com"))
    resp = await deliver(stack, disconnected(stack, "alice@example.com"), url=replica.public_url)
    assert (await resp.json())["disconnected"] == 1
    gone = await stack.chat("alice")  # served by the first replica
    assert gone.status == 401
    assert (await gone.json())["error"]["code"] == "wallet_not_connected"
    assert (await stack.chat("bob")).status == 200
    # The replay is refused by the replica that did not see the first delivery, too.
    again = await deliver(stack, disconnected(stack, "alice@example.com"))
    await refused(again, 409, "webhook_replayed")


async def test_a_user_disconnecting_the_app_in_quota_disconnects_them_here(stack: Stack) -> None:
    stack.quota.settings.webhook_url = f"{stack.public_url}/auth/quota/webhook"
    stack.quota.settings.webhook_secret = SECRET
    await stack.connect("alice")
    await stack.connect("bob")
    deliveries = f"{stack.quota_url}/_mock/webhooks"
    async with aiohttp.ClientSession() as dashboard:
        resp = await dashboard.post(
            f"{stack.quota_url}/_mock/users/{user_id_for('alice@example.com')}/disconnect"
        )
        assert resp.status == 200
        deadline = time.monotonic() + WAIT_S
        while [
            d["status"]
            for d in await (await dashboard.get(deliveries)).json()
            if d["type"] == "user.disconnected"
        ] != [200]:
            assert time.monotonic() < deadline, "the webhook was not delivered"
            await asyncio.sleep(0.02)
    assert not await still_connected(stack, "alice")
    assert await still_connected(stack, "bob")


async def test_a_verified_event_is_passed_on_to_the_host_app(stack: Stack) -> None:
    events = {"url": f"{stack.upstream_url}/quota/events", "secret": "e" * 32}
    async with another_sidecar(stack, webhooks=WEBHOOKS["webhooks"], events=events) as other:
        envelope = event(stack, "balance.low", {"user_id": "usr_x", "balance": 5})
        assert (await deliver(stack, envelope, url=other.public_url)).status == 200
        deadline = time.monotonic() + WAIT_S
        while not (got := [r for r in stack.upstream.requests if r.path_qs == "/quota/events"]):
            assert time.monotonic() < deadline, "the event did not reach the app"
            await asyncio.sleep(0.02)
    sent = json.loads(got[0].body)
    assert (sent["type"], sent["data"]) == ("balance.low", envelope["data"])
