"""The backend's view of any user: GET/DELETE /auth/quota/users/{id}, and what feeds it.

What a record knows about its user (both ids), how its last refresh went, and ``needs_reconnect``
when Quota refuses the grant for a scope it lacks (403 insufficient_scope).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web

from sidecar.mock_quota.wallets import user_id_for
from sidecar.oauth import QuotaClient
from sidecar.tokens.model import TokenRecord
from tests.integration.conftest import Stack
from tests.integration.sidecars import another_sidecar, start_faulty_quota
from tests.support import make_config

WAIT_S = 5.0  # bound on waiting for a background status write


async def user_status(stack: Stack, user: str, **headers: str) -> aiohttp.ClientResponse:
    return await stack.backend.get(
        f"{stack.internal_url}/auth/quota/users/{quote(user, safe='')}", headers=headers
    )


async def record_of(stack: Stack, user: str = "alice") -> TokenRecord:
    record = await stack.store.get(stack.user_key(user))
    assert record is not None
    return record


async def expire_soon(stack: Stack, user: str = "alice") -> None:
    """Into the wait skew: the next call waits for the refresh, so its outcome is on the record."""
    record = await record_of(stack, user)
    stack.clock.now = record.expires_at - stack.config.tokens.refresh_wait_skew_s + 1


async def wait_for_mark(stack: Stack, user: str = "alice") -> TokenRecord:
    deadline = time.monotonic() + WAIT_S
    while not (record := await record_of(stack, user)).needs_reconnect:
        assert time.monotonic() < deadline, "needs_reconnect was not written"
        await asyncio.sleep(0.01)
    return record


# --- the status API ------------------------------------------------------------------------------


async def test_a_user_who_never_connected_is_not_connected(stack: Stack) -> None:
    resp = await user_status(stack, "bob")
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    assert await resp.json() == {
        "user": "bob",
        "state": "not_connected",
        "scopes": [],
        "missing_scope": [],
        "expires_at": None,
        "last_refresh": None,
        "quota_user_id": None,
    }


async def test_a_connected_user_shows_scopes_expiry_and_both_ids(stack: Stack) -> None:
    await stack.connect("alice")
    record = await record_of(stack)
    assert record.user_id == "alice"
    assert record.quota_user_id == user_id_for("alice@example.com")
    assert stack.quota.counters["userinfo"] == 1
    assert await (await user_status(stack, "alice")).json() == {
        "user": "alice",
        "state": "connected",
        "scopes": ["credits.read", "credits.spend"],
        "missing_scope": [],
        "expires_at": int(record.expires_at),
        "last_refresh": None,
        "quota_user_id": user_id_for("alice@example.com"),
    }


async def test_a_refresh_is_reported_with_its_outcome_and_time_and_keeps_the_ids(
    stack: Stack,
) -> None:
    await stack.connect("alice")
    await expire_soon(stack)
    assert (await stack.chat("alice")).status == 200
    body = await (await user_status(stack, "alice")).json()
    assert body["last_refresh"] == {"outcome": "ok", "at": int(stack.clock())}
    assert body["quota_user_id"] == user_id_for("alice@example.com")
    assert (await record_of(stack)).user_id == "alice"


async def test_a_failed_refresh_is_reported_as_transient(stack: Stack) -> None:
    await stack.connect("alice")
    await expire_soon(stack)
    stack.quota.settings.token_fail_status = 503
    stack.quota.settings.token_fail_count = -1
    assert (await stack.chat("alice")).status == 200  # the old token is still good
    body = await (await user_status(stack, "alice")).json()
    assert body["state"] == "connected"
    assert body["last_refresh"] == {"outcome": "transient", "at": int(stack.clock())}


async def test_a_record_sealed_before_the_status_fields_still_opens(stack: Stack) -> None:
    """A record written by an older sidecar has no ids or status: it loads with defaults."""
    old = TokenRecord("quota_token_old", "quota_refresh_old", stack.clock() + 3600, "x", 0.0)
    payload = {k: v for k, v in old.to_json().items() if k in ("access_token", "refresh_token")}
    payload |= {"expires_at": old.expires_at, "scope": "credits.read", "obtained_at": 0.0}
    loaded = TokenRecord.from_json(payload, version=7)
    assert (loaded.user_id, loaded.quota_user_id, loaded.needs_reconnect) == (None, None, False)
    assert (loaded.missing_scope, loaded.last_refresh_outcome, loaded.last_refresh_at) == (
        "",
        None,
        None,
    )


@pytest.mark.parametrize("user", ["x" * 300, "tab\there", " padded"])
async def test_a_user_id_that_the_identity_header_would_refuse_is_400(
    stack: Stack, user: str
) -> None:
    for resp in (
        await user_status(stack, user),
        await stack.backend.delete(f"{stack.internal_url}/auth/quota/users/{quote(user, safe='')}"),
        await stack.backend.get(
            f"{stack.internal_url}/auth/quota/connect-url", params={"user": user}
        ),
    ):
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "identity_invalid"


async def test_a_user_id_with_a_slash_is_addressed_percent_encoded(stack: Stack) -> None:
    resp = await user_status(stack, "team/alice")
    assert resp.status == 200
    assert (await resp.json())["user"] == "team/alice"


async def test_delete_forgets_the_user_and_revokes_at_quota(stack: Stack) -> None:
    await stack.connect("alice")
    await stack.connect("bob")
    url = f"{stack.internal_url}/auth/quota/users/alice"
    resp = await stack.backend.delete(url)
    assert resp.status == 200
    assert await resp.json() == {"user": "alice", "state": "not_connected", "deleted": True}
    assert await stack.store.get(stack.user_key("alice")) is None
    assert stack.quota.counters["revoke"] == 1
    assert (await stack.chat("alice")).status == 401
    assert (await stack.chat("bob")).status == 200
    again = await stack.backend.delete(url)
    assert await again.json() == {"user": "alice", "state": "not_connected", "deleted": False}


INTERNAL_KEY = "internal-key-for-the-user-routes-0123"


@pytest.mark.parametrize("config_overrides", [{"identity": {"internal_api_key": INTERNAL_KEY}}])
async def test_the_internal_api_key_guards_the_user_routes(stack: Stack) -> None:
    for method, path in (
        ("GET", "/auth/quota/users/alice"),
        ("DELETE", "/auth/quota/users/alice"),
        ("GET", "/auth/quota/connect-url?user=alice"),
    ):
        refused = await stack.backend.request(method, stack.internal_url + path)
        assert refused.status == 401
        assert (await refused.json())["error"]["code"] == "invalid_api_key"
    allowed = await user_status(stack, "alice", Authorization=f"Bearer {INTERNAL_KEY}")
    assert allowed.status == 200


async def test_the_user_routes_are_not_on_the_public_listener(stack: Stack) -> None:
    stack.browser.sign_in(stack.public_url, "alice")
    for method in ("GET", "DELETE"):
        resp = await stack.browser.session.request(
            method, f"{stack.public_url}/auth/quota/users/alice"
        )
        assert resp.status == 404
    resp = await stack.browser.get(f"{stack.public_url}/auth/quota/connect-url?user=alice")
    assert resp.status == 404


# --- the Quota user id, learnt at connect ---------------------------------------------------------


async def test_without_userinfo_the_quota_user_id_comes_from_the_balance(
    stack: Stack, aiohttp_server: Callable[..., Any]
) -> None:
    proxy, url = await start_faulty_quota(aiohttp_server, stack, ["/oauth/userinfo"])
    try:
        async with another_sidecar(stack, quota_url=url) as other:
            stack.browser.sign_in(other.public_url, "alice")
            consent = await stack.browser.get(f"{other.public_url}/auth/quota/connect")
            await approve(stack, consent)
            record = await other.services.tokens.store.get(stack.user_key("alice"))
    finally:
        await proxy.close()
    assert record is not None
    assert record.quota_user_id == user_id_for("alice@example.com")
    assert stack.quota.counters["balance"] == 1


async def test_when_quota_names_no_one_the_connect_still_succeeds_without_the_id(
    stack: Stack, aiohttp_server: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    proxy, url = await start_faulty_quota(aiohttp_server, stack, ["/oauth/userinfo", "/v1/balance"])
    try:
        async with another_sidecar(stack, quota_url=url) as other:
            stack.browser.sign_in(other.public_url, "alice")
            consent = await stack.browser.get(f"{other.public_url}/auth/quota/connect")
            landed = await approve(stack, consent)
            record = await other.services.tokens.store.get(stack.user_key("alice"))
    finally:
        await proxy.close()
    assert "quota_error" not in landed.url.query
    assert record is not None
    assert (record.user_id, record.quota_user_id) == ("alice", None)
    assert any("did not say who the user is" in r.getMessage() for r in caplog.records)


async def approve(stack: Stack, consent: aiohttp.ClientResponse) -> aiohttp.ClientResponse:
    from tests.support import approve_consent

    assert consent.status == 200, await consent.text()
    return await approve_consent(stack.browser, consent, "alice@example.com")


@pytest.fixture
async def userinfo_answers(
    aiohttp_server: Callable[..., Any],
) -> AsyncIterator[tuple[QuotaClient, dict[str, tuple[int, str]]]]:
    """A QuotaClient against a server whose /oauth/userinfo and /v1/balance answers are set."""
    answers: dict[str, tuple[int, str]] = {}

    async def answer(request: web.Request) -> web.Response:
        status, body = answers.get(request.path, (404, "{}"))
        return web.Response(status=status, text=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    server = await aiohttp_server(app)
    base = str(server.make_url("")).rstrip("/")
    config = make_config(quota={"base_url": base})
    async with aiohttp.ClientSession() as http:
        yield QuotaClient(http, config.quota), answers


@pytest.mark.parametrize(
    ("userinfo", "balance", "expected"),
    [
        ((200, '{"sub": "usr_a"}'), (200, '{"user_id": "usr_b"}'), "usr_a"),
        ((403, '{"error": "insufficient_scope"}'), (200, '{"user_id": "usr_b"}'), "usr_b"),
        ((200, '{"sub": 42}'), (200, '{"user_id": "usr_b"}'), "usr_b"),
        ((200, "<html>"), (200, '{"balance": 5}'), None),
        ((500, "{}"), (503, "{}"), None),
        ((200, '{"sub": ""}'), (200, '{"user_id": null}'), None),
    ],
    ids=[
        "userinfo",
        "balance-fallback",
        "sub-not-a-string",
        "neither-names-one",
        "both-down",
        "empty-values",
    ],
)
async def test_the_quota_user_id_is_userinfo_sub_else_balance_user_id_else_none(
    userinfo_answers: tuple[QuotaClient, dict[str, tuple[int, str]]],
    userinfo: tuple[int, str],
    balance: tuple[int, str],
    expected: str | None,
) -> None:
    client, answers = userinfo_answers
    answers["/oauth/userinfo"], answers["/v1/balance"] = userinfo, balance
    assert await client.quota_user_id("quota_token_x") == expected


# --- needs_reconnect: Quota refused the grant for a missing scope ---------------------------------


@pytest.mark.parametrize("config_overrides", [{"quota": {"scopes": ["credits.read"]}}])
async def test_a_403_insufficient_scope_on_v1_marks_the_user_needs_reconnect(
    stack: Stack,
) -> None:
    await stack.connect("alice")
    resp = await stack.chat("alice")
    assert resp.status == 403
    body = await resp.json()
    assert body["error"]["code"] == "insufficient_scope"
    assert "request_id" not in body["error"]  # Quota's own body, untouched
    record = await wait_for_mark(stack)
    assert record.missing_scope == "credits.spend"
    assert record.access_token  # the tokens are kept
    status = await (await user_status(stack, "alice")).json()
    assert (status["state"], status["missing_scope"]) == ("needs_reconnect", ["credits.spend"])
    legacy = await stack.backend.get(
        f"{stack.internal_url}/auth/quota/status", headers={"X-Quota-User": "alice"}
    )
    assert await legacy.json() == {
        "connected": True,
        "scopes": ["credits.read"],
        "expires_at": int(record.expires_at),
        "state": "needs_reconnect",
        "needs_reconnect": True,
    }
    stack.browser.sign_in(stack.public_url, "alice")
    browser = await stack.browser.get(f"{stack.public_url}/auth/quota/status")
    assert (await browser.json())["state"] == "needs_reconnect"


@pytest.mark.parametrize("config_overrides", [{"quota": {"scopes": ["credits.spend"]}}])
async def test_a_403_insufficient_scope_on_the_balance_marks_credits_read_missing(
    stack: Stack,
) -> None:
    await stack.connect("alice")
    resp = await stack.backend.get(
        f"{stack.internal_url}/auth/quota/balance", headers={"X-Quota-User": "alice"}
    )
    assert resp.status == 403
    record = await record_of(stack)
    assert (record.needs_reconnect, record.missing_scope) == (True, "credits.read")


@pytest.mark.parametrize("config_overrides", [{"quota": {"scopes": ["credits.read"]}}])
async def test_a_refresh_keeps_needs_reconnect_and_a_new_connect_clears_it(stack: Stack) -> None:
    await stack.connect("alice")
    assert (await stack.chat("alice")).status == 403
    await wait_for_mark(stack)
    await expire_soon(stack)
    models = await stack.backend.get(
        f"{stack.internal_url}/v1/models", headers={"X-Quota-User": "alice"}
    )
    assert models.status == 200
    refreshed = await record_of(stack)
    assert refreshed.last_refresh_outcome == "ok"
    assert (refreshed.needs_reconnect, refreshed.missing_scope) == (True, "credits.spend")
    await stack.connect("alice")
    reconnected = await record_of(stack)
    assert (reconnected.needs_reconnect, reconnected.missing_scope) == (False, "")
