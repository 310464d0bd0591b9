"""The Quota emulator's developer API: login, app registration and its validation."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.mock_quota import MockQuota, create_app

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
Http = TestClient[Any, Any]

APP = {
    "name": "My App",
    "redirect_uris": ["https://app.example/auth/quota/callback"],
    "allowed_scopes": ["credits.read", "credits.spend"],
}


@pytest.fixture
def quota() -> MockQuota:
    return MockQuota()


@pytest.fixture
async def http(aiohttp_client: ClientFactory, quota: MockQuota) -> Http:
    return await aiohttp_client(create_app(quota))


@pytest.fixture
async def session(http: Http) -> dict[str, str]:
    resp = await http.post(
        "/auth/login", json={"email": "dev@quota.local", "password": "quota-dev-password"}
    )
    assert resp.status == 200
    token = (await resp.json())["session_token"]
    return {"Authorization": f"Bearer {token}"}


async def test_login_returns_a_session_token(http: Http) -> None:
    resp = await http.post(
        "/auth/login", json={"email": "DEV@quota.local", "password": "quota-dev-password"}
    )
    assert (await resp.json())["session_token"].startswith("sess_")


@pytest.mark.parametrize(
    "credentials",
    [
        {"email": "dev@quota.local", "password": "wrong"},
        {"email": "nobody@quota.local", "password": "quota-dev-password"},
    ],
)
async def test_login_with_wrong_credentials_is_401(http: Http, credentials: dict[str, str]) -> None:
    resp = await http.post("/auth/login", json=credentials)
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "invalid_credentials"


async def test_an_added_developer_can_log_in(http: Http, quota: MockQuota) -> None:
    quota.add_developer("ada@example.com", "correct horse")
    resp = await http.post(
        "/auth/login", json={"email": "ada@example.com", "password": "correct horse"}
    )
    assert resp.status == 200


async def test_registering_an_app_returns_its_credentials_once(
    http: Http, quota: MockQuota, session: dict[str, str]
) -> None:
    resp = await http.post("/developers/apps", json=APP, headers=session)
    created = await resp.json()
    assert resp.status == 201, created
    assert created["client_id"].startswith("quota_client_")
    assert created["client_secret"].startswith("quota_secret_")
    assert created["id"].startswith("app_")
    assert created["name"] == "My App"
    assert created["redirect_uris"] == APP["redirect_uris"]
    assert created["allowed_scopes"] == APP["allowed_scopes"]
    assert isinstance(created["created_at"], int)
    assert quota.counters["apps.created"] == 1

    listed = await (await http.get("/developers/apps", headers=session)).json()
    assert [app["client_id"] for app in listed["data"]] == [created["client_id"]]
    assert "client_secret" not in listed["data"][0]


async def test_a_registered_app_can_run_the_code_flow(http: Http, session: dict[str, str]) -> None:
    created = await (await http.post("/developers/apps", json=APP, headers=session)).json()
    verifier = secrets.token_urlsafe(32)
    challenge = (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )
    redirect_uri = APP["redirect_uris"][0]
    form = {
        "response_type": "code",
        "client_id": created["client_id"],
        "redirect_uri": redirect_uri,
        "scope": "credits.read",
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "email": "carol@example.com",
        "decision": "approve",
    }
    resp = await http.post("/oauth/authorize", data=form, allow_redirects=False)
    code = parse_qs(urlsplit(resp.headers["Location"]).query)["code"][0]
    token = await http.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "client_id": created["client_id"],
            "client_secret": created["client_secret"],
            "code_verifier": verifier,
        },
    )
    assert token.status == 200


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"redirect_uris": ["http://app.example/cb"]}, "invalid_redirect_uri"),
        ({"redirect_uris": ["/relative/cb"]}, "invalid_redirect_uri"),
        ({"redirect_uris": ["ftp://app.example/cb"]}, "invalid_redirect_uri"),
        ({"redirect_uris": ["https://app.example/cb#frag"]}, "invalid_redirect_uri"),
        ({"allowed_scopes": ["credits.read", "credits.steal"]}, "invalid_scope"),
        ({"redirect_uris": []}, "invalid_request"),
        ({"name": ""}, "invalid_request"),
    ],
)
async def test_app_registration_validates_its_input(
    http: Http, quota: MockQuota, session: dict[str, str], changes: dict[str, object], code: str
) -> None:
    resp = await http.post("/developers/apps", json={**APP, **changes}, headers=session)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == code
    assert quota.counters["apps.created"] == 0


@pytest.mark.parametrize(
    "redirect_uri",
    ["http://localhost:5180/auth/quota/callback", "http://127.0.0.1:8080/cb"],
)
async def test_plain_http_redirects_are_allowed_on_loopback(
    http: Http, session: dict[str, str], redirect_uri: str
) -> None:
    resp = await http.post(
        "/developers/apps", json={**APP, "redirect_uris": [redirect_uri]}, headers=session
    )
    assert resp.status == 201


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "invalid_api_key"),
        ("Bearer sess_unknown", "invalid_token"),
        ("Bearer quota_token_abc", "invalid_api_key"),
    ],
)
async def test_developer_routes_need_a_session(
    http: Http, authorization: str | None, code: str
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    for method in ("GET", "POST"):
        resp = await http.request(method, "/developers/apps", json=APP, headers=headers)
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == code
