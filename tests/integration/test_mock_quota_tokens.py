"""The Quota emulator's tokens after issue: rotation, reuse, expiry, revocation, faults, styles."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.mock_quota import MockQuota, create_app

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
Http = TestClient[Any, Any]

CLIENT_ID = "quota_client_test"
CLIENT_SECRET = "quota_secret_test"
CREDENTIALS = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def quota(clock: FakeClock) -> MockQuota:
    state = MockQuota(clock=clock)
    state.register_client(
        name="Demo",
        redirect_uris=["http://localhost:5180/auth/quota/callback"],
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
    )
    return state


@pytest.fixture
async def http(aiohttp_client: ClientFactory, quota: MockQuota) -> Http:
    return await aiohttp_client(create_app(quota))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def refresh(http: Http, refresh_token: str, **overrides: str) -> Any:
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, **CREDENTIALS}
    return await http.post("/oauth/token", data={**form, **overrides})


async def balance_status(http: Http, access_token: str) -> int:
    return (await http.get("/v1/balance", headers=bearer(access_token))).status


async def test_refresh_rotates_the_pair_and_old_access_tokens_live_on(
    http: Http, quota: MockQuota
) -> None:
    first = quota.issue_grant(CLIENT_ID, "alice@example.com")
    resp = await refresh(http, str(first["refresh_token"]))
    second = await resp.json()
    assert resp.status == 200, second
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]
    assert second["scope"] == "credits.read credits.spend"
    assert await balance_status(http, second["access_token"]) == 200
    assert await balance_status(http, str(first["access_token"])) == 200
    assert quota.counters["token.refresh_token"] == 1
    assert quota.counters["token.refresh_ok"] == 1


async def test_reused_refresh_token_revokes_the_whole_grant(http: Http, quota: MockQuota) -> None:
    first = quota.issue_grant(CLIENT_ID, "alice@example.com")
    second = await (await refresh(http, str(first["refresh_token"]))).json()

    reuse = await refresh(http, str(first["refresh_token"]))
    assert reuse.status == 400
    assert (await reuse.json())["error"] == "invalid_grant"
    assert quota.counters["token.refresh_reuse"] == 1
    assert await balance_status(http, second["access_token"]) == 401
    assert await balance_status(http, str(first["access_token"])) == 401
    assert (await (await refresh(http, second["refresh_token"])).json())["error"] == "invalid_grant"
    assert quota.counters["token.refresh_token"] == 3
    assert quota.counters["token.refresh_ok"] == 1


async def test_refresh_token_of_another_client_is_invalid_grant(
    http: Http, quota: MockQuota
) -> None:
    other = quota.register_client(name="Other", redirect_uris=["https://other.example/cb"])
    tokens = quota.issue_grant(CLIENT_ID, "alice@example.com")
    resp = await refresh(
        http,
        str(tokens["refresh_token"]),
        client_id=other.client_id,
        client_secret=other.client_secret,
    )
    assert (await resp.json())["error"] == "invalid_grant"
    assert (await refresh(http, str(tokens["refresh_token"]))).status == 200


async def test_unknown_refresh_token_is_invalid_grant(http: Http) -> None:
    resp = await refresh(http, "quota_refresh_nope")
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_grant"


async def test_refresh_may_narrow_but_not_widen_the_scope(http: Http, quota: MockQuota) -> None:
    tokens = quota.issue_grant(CLIENT_ID, "alice@example.com")
    wider = await refresh(http, str(tokens["refresh_token"]), scope="credits.read apps.write")
    assert (await wider.json())["error"] == "invalid_scope"
    narrower = await (
        await refresh(http, str(tokens["refresh_token"]), scope="credits.read")
    ).json()
    assert narrower["scope"] == "credits.read"


async def test_expired_access_token_is_invalid_token(
    http: Http, quota: MockQuota, clock: FakeClock
) -> None:
    quota.settings.access_token_ttl_s = 120
    tokens = quota.issue_grant(CLIENT_ID, "alice@example.com")
    assert tokens["expires_in"] == 120
    clock.advance(119)
    assert await balance_status(http, str(tokens["access_token"])) == 200
    clock.advance(1)
    resp = await http.get("/v1/balance", headers=bearer(str(tokens["access_token"])))
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "invalid_token"
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    renewed = await (await refresh(http, str(tokens["refresh_token"]))).json()
    assert await balance_status(http, renewed["access_token"]) == 200


async def test_a_sub_second_lifetime_still_reports_expires_in_of_one(quota: MockQuota) -> None:
    quota.settings.access_token_ttl_s = 0.25
    assert quota.issue_grant(CLIENT_ID, "alice@example.com")["expires_in"] == 1


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        (
            "rfc6749",
            {"error": "invalid_grant", "error_description": "Unknown refresh token."},
        ),
        (
            "quota",
            {"error": {"code": "invalid_grant", "message": "Unknown refresh token."}},
        ),
    ],
)
async def test_token_errors_follow_the_configured_style(
    http: Http, quota: MockQuota, style: str, expected: dict[str, object]
) -> None:
    quota.settings.apply({"oauth_error_style": style})
    resp = await refresh(http, "quota_refresh_nope")
    assert await resp.json() == expected


@pytest.mark.parametrize(
    ("status", "error"),
    [(503, "server_error"), (500, "server_error"), (400, "invalid_grant")],
)
async def test_injected_token_failures_answer_n_calls_then_recover(
    http: Http, quota: MockQuota, status: int, error: str
) -> None:
    tokens = quota.issue_grant(CLIENT_ID, "alice@example.com")
    quota.settings.apply({"token_fail_status": status, "token_fail_count": 2})
    for _ in range(2):
        resp = await refresh(http, str(tokens["refresh_token"]))
        assert resp.status == status
        assert (await resp.json())["error"] == error
    assert (await refresh(http, str(tokens["refresh_token"]))).status == 200
    assert quota.counters["token.refresh_token"] == 3
    assert quota.counters["token.injected_failures"] == 2
    assert quota.counters["token.refresh_ok"] == 1


async def test_injected_failure_with_count_minus_one_hits_every_call(
    http: Http, quota: MockQuota
) -> None:
    quota.settings.apply(
        {"token_fail_status": 502, "token_fail_count": -1, "oauth_error_style": "quota"}
    )
    for _ in range(3):
        resp = await refresh(http, "quota_refresh_any")
        assert resp.status == 502
        assert (await resp.json())["error"]["code"] == "server_error"
    assert quota.settings.token_fail_count == -1


async def test_token_delay_holds_the_answer_back(http: Http, quota: MockQuota) -> None:
    tokens = quota.issue_grant(CLIENT_ID, "alice@example.com")
    quota.settings.token_delay_s = 0.3
    started = time.monotonic()
    resp = await refresh(http, str(tokens["refresh_token"]))
    assert resp.status == 200
    assert time.monotonic() - started >= 0.3


async def test_response_delay_rotates_first_so_a_client_that_gives_up_loses_the_pair(
    http: Http, quota: MockQuota
) -> None:
    tokens = quota.issue_grant(CLIENT_ID, "alice@example.com")
    quota.settings.token_response_delay_s = 0.5
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(refresh(http, str(tokens["refresh_token"])), timeout=0.2)
    await asyncio.sleep(0.1)
    assert quota.counters["token.refresh_ok"] == 1
    quota.settings.token_response_delay_s = 0
    again = await refresh(http, str(tokens["refresh_token"]))
    assert again.status == 400  # the old token was rotated away: reuse
    assert quota.counters["token.refresh_reuse"] == 1


async def test_a_client_giving_up_during_the_token_delay_leaves_the_server_healthy(
    http: Http, quota: MockQuota
) -> None:
    tokens = quota.issue_grant(CLIENT_ID, "alice@example.com")
    quota.settings.token_delay_s = 5
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(refresh(http, str(tokens["refresh_token"])), timeout=0.1)
    quota.settings.token_delay_s = 0
    assert (await http.get("/.well-known/openid-configuration")).status == 200


async def test_revoking_an_access_token_stops_only_that_token(http: Http, quota: MockQuota) -> None:
    tokens = quota.issue_grant(CLIENT_ID, "alice@example.com")
    resp = await http.post(
        "/oauth/revoke",
        data={"token": tokens["access_token"], "token_type_hint": "access_token", **CREDENTIALS},
    )
    assert resp.status == 200
    assert await resp.read() == b""
    assert await balance_status(http, str(tokens["access_token"])) == 401
    renewed = await refresh(http, str(tokens["refresh_token"]))
    assert renewed.status == 200
    assert quota.counters["revoke"] == 1


async def test_revoking_a_refresh_token_revokes_the_grant(http: Http, quota: MockQuota) -> None:
    tokens = quota.issue_grant(CLIENT_ID, "alice@example.com")
    resp = await http.post("/oauth/revoke", data={"token": tokens["refresh_token"], **CREDENTIALS})
    assert resp.status == 200
    assert await balance_status(http, str(tokens["access_token"])) == 401
    assert (await refresh(http, str(tokens["refresh_token"]))).status == 400


async def test_revoke_answers_200_for_an_unknown_token(http: Http) -> None:
    resp = await http.post("/oauth/revoke", data={"token": "quota_token_nope", **CREDENTIALS})
    assert resp.status == 200


async def test_revoke_refuses_bad_client_authentication(http: Http, quota: MockQuota) -> None:
    tokens = quota.issue_grant(CLIENT_ID, "alice@example.com")
    resp = await http.post(
        "/oauth/revoke",
        data={"token": tokens["access_token"], "client_id": CLIENT_ID, "client_secret": "nope"},
    )
    assert resp.status == 401
    assert (await resp.json())["error"] == "invalid_client"
    assert await balance_status(http, str(tokens["access_token"])) == 200


async def test_userinfo_names_the_account_with_a_stable_subject(
    http: Http, quota: MockQuota
) -> None:
    first = quota.issue_grant(CLIENT_ID, "Alice@Example.com")
    second = quota.issue_grant(CLIENT_ID, "alice@example.com")
    one = await (
        await http.get("/oauth/userinfo", headers=bearer(str(first["access_token"])))
    ).json()
    two = await (
        await http.get("/oauth/userinfo", headers=bearer(str(second["access_token"])))
    ).json()
    assert one == two
    assert one["email"] == "alice@example.com"
    assert one["sub"].startswith("usr_")
    assert quota.counters["userinfo"] == 2


async def test_userinfo_without_a_token_is_invalid_token(http: Http) -> None:
    resp = await http.get("/oauth/userinfo")
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "invalid_token"


async def test_discovery_describes_the_server_at_its_own_origin(http: Http) -> None:
    resp = await http.get("/.well-known/openid-configuration")
    doc = await resp.json()
    origin = str(http.make_url("")).rstrip("/")
    assert doc["issuer"] == origin
    assert doc["authorization_endpoint"] == f"{origin}/oauth/authorize"
    assert doc["token_endpoint"] == f"{origin}/oauth/token"
    assert doc["userinfo_endpoint"] == f"{origin}/oauth/userinfo"
    assert doc["revocation_endpoint"] == f"{origin}/oauth/revoke"
    assert doc["grant_types_supported"] == ["authorization_code", "refresh_token"]
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["token_endpoint_auth_methods_supported"] == [
        "client_secret_post",
        "client_secret_basic",
        "none",
    ]
    assert {"credits.read", "credits.spend", "openid"} <= set(doc["scopes_supported"])
