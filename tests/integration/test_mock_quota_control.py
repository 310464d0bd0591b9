"""The Quota emulator's control API, request recording and error rendering."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.mock_quota import MOCK_QUOTA_KEY, MockQuota, MockSettings, create_app

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
Http = TestClient[Any, Any]


@pytest.fixture
def quota() -> MockQuota:
    return MockQuota()


@pytest.fixture
async def http(aiohttp_client: ClientFactory, quota: MockQuota) -> Http:
    return await aiohttp_client(create_app(quota))


def test_the_app_keeps_its_state_under_the_typed_key(quota: MockQuota) -> None:
    assert create_app(quota)[MOCK_QUOTA_KEY] is quota


async def test_state_reports_counters_settings_and_wallets(http: Http, quota: MockQuota) -> None:
    quota.set_balance("alice@example.com", 7)
    await http.get("/v1/models")
    state = await (await http.get("/_mock/state")).json()
    assert state["counters"]["models"] == 1
    assert state["settings"] == MockSettings().to_json()
    assert state["wallets"] == {"alice@example.com": 7}


async def test_patching_settings_changes_the_running_emulator(http: Http, quota: MockQuota) -> None:
    resp = await http.patch(
        "/_mock/settings", json={"access_token_ttl_s": 5, "token_fail_status": 503}
    )
    assert resp.status == 200
    assert (await resp.json())["access_token_ttl_s"] == 5
    assert quota.settings.access_token_ttl_s == 5
    assert quota.settings.token_fail_status == 503


@pytest.mark.parametrize(
    ("patch", "named"),
    [
        ({"no_such_setting": 1}, "no_such_setting"),
        ({"access_token_ttl_s": "soon"}, "access_token_ttl_s"),
        ({"access_token_ttl_s": 0}, "access_token_ttl_s"),
        ({"token_fail_status": 200}, "token_fail_status"),
        ({"token_fail_count": -2}, "token_fail_count"),
        ({"default_balance": True}, "default_balance"),
        ({"oauth_error_style": "xml"}, "oauth_error_style"),
        ({"auto_approve_email": "nobody"}, "auto_approve_email"),
        ({"webhook_url": "not a url"}, "webhook_url"),
        ({"webhook_url": "ftp://hooks.example/in"}, "webhook_url"),
        ({"webhook_secret": "secret"}, "webhook_secret"),
        ({"webhook_secret": "whsec_"}, "webhook_secret"),
        ({"low_balance_threshold": -1}, "low_balance_threshold"),
    ],
)
async def test_a_bad_settings_patch_is_400_and_changes_nothing(
    http: Http, quota: MockQuota, patch: dict[str, object], named: str
) -> None:
    resp = await http.patch("/_mock/settings", json={"chunk_delay_s": 1, **patch})
    body = await resp.json()
    assert resp.status == 400
    assert named in body["error"]["message"]
    assert quota.settings == MockSettings()


async def test_webhook_settings_can_be_patched_and_unset(http: Http, quota: MockQuota) -> None:
    patch = {
        "webhook_url": "http://127.0.0.1:5180/hooks",
        "webhook_secret": "whsec_abc",
        "low_balance_threshold": 0,
    }
    resp = await http.patch("/_mock/settings", json=patch)
    assert resp.status == 200
    assert (await resp.json()).items() >= patch.items()
    assert (await http.patch("/_mock/settings", json={"webhook_url": None})).status == 200
    assert quota.settings.webhook_url is None


async def test_wallets_can_be_read_and_set(http: Http, quota: MockQuota) -> None:
    resp = await http.get("/_mock/wallets/bob@example.com")
    assert await resp.json() == {"email": "bob@example.com", "balance": 5_000_000}
    resp = await http.put("/_mock/wallets/Bob@Example.com", json={"balance": 0})
    assert await resp.json() == {"email": "bob@example.com", "balance": 0}
    assert quota.balance("bob@example.com") == 0
    bad = await http.put("/_mock/wallets/bob@example.com", json={"balance": "lots"})
    assert bad.status == 400


async def test_requests_are_recorded_with_joined_headers_and_body(
    http: Http, quota: MockQuota
) -> None:
    await http.post(
        "/oauth/token?x=1",
        data=b"grant_type=nope",
        headers=[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("X-Multi", "a"),
            ("X-Multi", "b"),
        ],
    )
    recorded = quota.requests[-1]
    assert recorded.method == "POST"
    assert recorded.path == "/oauth/token"
    assert recorded.query_string == "x=1"
    assert recorded.headers["X-Multi"] == "a, b"
    assert recorded.body == b"grant_type=nope"
    assert quota.counters["requests"] == 1

    listed = await (await http.get("/_mock/requests")).json()
    assert listed[-1]["body"] == "grant_type=nope"
    assert len(quota.requests) == 1, "control calls are not recorded"


async def test_the_request_log_keeps_the_last_200(http: Http, quota: MockQuota) -> None:
    for _ in range(205):
        await http.get("/v1/models")
    assert len(quota.requests) == 200
    assert quota.counters["requests"] == 205


async def test_reset_clears_counters_and_recorded_requests(http: Http, quota: MockQuota) -> None:
    quota.set_balance("alice@example.com", 9)
    await http.get("/v1/balance")
    resp = await http.post("/_mock/reset")
    assert resp.status == 204
    assert not quota.counters
    assert not quota.requests
    assert quota.balance("alice@example.com") == 9


@pytest.mark.parametrize("path", ["/nope", "/v1/nothing-here", "/v2/chat/completions"])
async def test_unknown_paths_are_404_in_quota_error_shape(http: Http, path: str) -> None:
    resp = await http.get(path)
    assert resp.status == 404
    assert await resp.json() == {
        "error": {"code": "not_found", "message": "No such route.", "type": "not_found_error"}
    }


async def test_a_wrong_method_is_405_in_quota_error_shape(http: Http) -> None:
    resp = await http.delete("/v1/models")
    assert resp.status == 405
    assert (await resp.json())["error"]["code"] == "method_not_allowed"
    assert "GET" in resp.headers["Allow"]


async def test_an_unexpected_exception_becomes_a_json_500(
    aiohttp_client: ClientFactory, quota: MockQuota, caplog: pytest.LogCaptureFixture
) -> None:
    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("kaboom")

    app = create_app(quota)
    app.router.add_get("/boom", boom)
    http = await aiohttp_client(app)
    resp = await http.get("/boom")
    assert resp.status == 500
    body = await resp.json()
    assert body["error"]["code"] == "internal_error"
    assert "kaboom" not in body["error"]["message"]
    assert "kaboom" in caplog.text
