"""The Quota emulator's authorization-code flow: consent page, redirects, code exchange, PKCE."""

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

REDIRECT_URI = "http://localhost:5180/auth/quota/callback"
SCOPE = "credits.read credits.spend"

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
Http = TestClient[Any, Any]


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(32)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorize_params(client_id: str, challenge: str, /, **overrides: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": SCOPE,
        "state": "state-123",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(overrides)
    return {k: v for k, v in params.items() if v is not None}


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def quota(clock: FakeClock) -> MockQuota:
    state = MockQuota(clock=clock)
    state.register_client(
        name="Demo",
        redirect_uris=[REDIRECT_URI, "http://127.0.0.1:5180/cb?tenant=a"],
        allowed_scopes=["credits.read", "credits.spend"],
        client_id="quota_client_test",
        client_secret="quota_secret_test",
    )
    return state


@pytest.fixture
async def http(aiohttp_client: ClientFactory, quota: MockQuota) -> Http:
    return await aiohttp_client(create_app(quota))


async def approve(http: Http, params: dict[str, str], email: str = "alice@example.com") -> str:
    """POST the consent form as a browser would; the Location it redirects to."""
    form = {**params, "email": email, "decision": "approve"}
    resp = await http.post("/oauth/authorize", data=form, allow_redirects=False)
    assert resp.status == 302, await resp.text()
    return resp.headers["Location"]


async def exchange(http: Http, code: str, verifier: str, **overrides: str) -> Any:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "client_id": "quota_client_test",
        "client_secret": "quota_secret_test",
        "code_verifier": verifier,
        **overrides,
    }
    return await http.post("/oauth/token", data=form)


async def code_for(http: Http, challenge: str) -> str:
    location = await approve(http, authorize_params("quota_client_test", challenge))
    return query_of(location)["code"]


async def test_consent_page_shows_the_app_its_scopes_and_the_form(http: Http) -> None:
    _, challenge = make_pkce()
    resp = await http.get(
        "/oauth/authorize", params=authorize_params("quota_client_test", challenge)
    )
    page = await resp.text()
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert "Demo" in page
    assert "credits.spend" in page
    assert "Spend credits" in page
    assert 'id="email" name="email" value="user@quota.local"' in page
    assert 'id="approve"' in page
    assert 'id="deny"' in page
    assert f'name="code_challenge" value="{challenge}"' in page
    assert "<script" not in page
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]


async def test_consent_page_escapes_what_it_echoes(http: Http, quota: MockQuota) -> None:
    quota.register_client(
        name="<script>alert(1)</script>", redirect_uris=[REDIRECT_URI], client_id="evil"
    )
    _, challenge = make_pkce()
    state = '"><img src=x onerror=alert(1)>'
    params = authorize_params("evil", challenge, state=state)
    page = await (await http.get("/oauth/authorize", params=params)).text()
    assert "<script>alert" not in page
    assert "&lt;script&gt;" in page
    assert "<img" not in page


async def test_full_code_flow_with_pkce_issues_working_tokens(http: Http, quota: MockQuota) -> None:
    verifier, challenge = make_pkce()
    location = await approve(http, authorize_params("quota_client_test", challenge))
    assert location.startswith(REDIRECT_URI + "?")
    query = query_of(location)
    assert query["state"] == "state-123"

    resp = await exchange(http, query["code"], verifier)
    body = await resp.json()
    assert resp.status == 200, body
    assert resp.headers["Cache-Control"] == "no-store"
    assert body["token_type"] == "Bearer"
    assert body["access_token"].startswith("quota_token_")
    assert body["refresh_token"].startswith("quota_refresh_")
    assert body["expires_in"] == 3600
    assert body["scope"] == SCOPE
    balance = await http.get(
        "/v1/balance", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert balance.status == 200
    assert quota.counters["authorize.approved"] == 1
    assert quota.counters["token.authorization_code"] == 1


async def test_approve_appends_to_a_redirect_uri_that_already_has_a_query(http: Http) -> None:
    _, challenge = make_pkce()
    params = authorize_params(
        "quota_client_test", challenge, redirect_uri="http://127.0.0.1:5180/cb?tenant=a"
    )
    location = await approve(http, params)
    assert location.startswith("http://127.0.0.1:5180/cb?tenant=a&code=")
    assert query_of(location)["tenant"] == "a"


async def test_deny_redirects_with_access_denied_and_the_state(
    http: Http, quota: MockQuota
) -> None:
    _, challenge = make_pkce()
    form = {**authorize_params("quota_client_test", challenge), "decision": "deny"}
    resp = await http.post("/oauth/authorize", data=form, allow_redirects=False)
    query = query_of(resp.headers["Location"])
    assert resp.status == 302
    assert query["error"] == "access_denied"
    assert query["state"] == "state-123"
    assert "code" not in query
    assert quota.counters["authorize.denied"] == 1


async def test_auto_approve_skips_the_consent_page(http: Http, quota: MockQuota) -> None:
    quota.settings.auto_approve_email = "bob@example.com"
    verifier, challenge = make_pkce()
    resp = await http.get(
        "/oauth/authorize",
        params=authorize_params("quota_client_test", challenge),
        allow_redirects=False,
    )
    assert resp.status == 302
    tokens = await (
        await exchange(http, query_of(resp.headers["Location"])["code"], verifier)
    ).json()
    info = await http.get(
        "/oauth/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert (await info.json())["email"] == "bob@example.com"


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"client_id": "quota_client_unknown"}, "invalid_client"),
        ({"redirect_uri": "http://evil.example/callback"}, "invalid_redirect_uri"),
        ({"redirect_uri": REDIRECT_URI + "/"}, "invalid_redirect_uri"),
        ({"redirect_uri": "http://LOCALHOST:5180/auth/quota/callback"}, "invalid_redirect_uri"),
        ({"redirect_uri": None}, "invalid_redirect_uri"),
    ],
)
async def test_authorize_shows_an_error_page_instead_of_redirecting_to_an_untrusted_target(
    http: Http, overrides: dict[str, str | None], code: str
) -> None:
    _, challenge = make_pkce()
    params = authorize_params("quota_client_test", challenge, **overrides)
    resp = await http.get("/oauth/authorize", params=params, allow_redirects=False)
    assert resp.status == 400
    assert "Location" not in resp.headers
    assert code in await resp.text()


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"code_challenge": None}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge_method": None}, "invalid_request"),
        ({"code_challenge": "too-short"}, "invalid_request"),
        ({"scope": "credits.read account.write"}, "invalid_scope"),
        ({"scope": ""}, "invalid_scope"),
    ],
)
async def test_authorize_redirects_other_problems_back_with_error_and_state(
    http: Http, overrides: dict[str, str | None], error: str
) -> None:
    _, challenge = make_pkce()
    params = authorize_params("quota_client_test", challenge, **overrides)
    resp = await http.get("/oauth/authorize", params=params, allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"].startswith(REDIRECT_URI + "?")
    query = query_of(resp.headers["Location"])
    assert query["error"] == error
    assert query["state"] == "state-123"


async def test_authorize_requires_a_state(http: Http) -> None:
    _, challenge = make_pkce()
    params = authorize_params("quota_client_test", challenge, state=None)
    resp = await http.get("/oauth/authorize", params=params, allow_redirects=False)
    assert query_of(resp.headers["Location"]) == {
        "error": "invalid_request",
        "error_description": "state is required.",
    }


async def test_consent_post_checks_the_hidden_fields_again(http: Http, quota: MockQuota) -> None:
    _, challenge = make_pkce()
    tampered = {
        **authorize_params("quota_client_test", challenge, scope="credits.spend apps.write"),
        "email": "alice@example.com",
        "decision": "approve",
    }
    resp = await http.post("/oauth/authorize", data=tampered, allow_redirects=False)
    assert query_of(resp.headers["Location"])["error"] == "invalid_scope"

    elsewhere = {**tampered, "scope": SCOPE, "redirect_uri": "https://attacker.example/cb"}
    resp = await http.post("/oauth/authorize", data=elsewhere, allow_redirects=False)
    assert resp.status == 400
    assert "Location" not in resp.headers
    assert quota.counters["authorize.approved"] == 0


async def test_consent_post_with_a_bad_email_shows_the_page_again(http: Http) -> None:
    _, challenge = make_pkce()
    form = {**authorize_params("quota_client_test", challenge), "decision": "approve"}
    resp = await http.post(
        "/oauth/authorize", data={**form, "email": "not an email"}, allow_redirects=False
    )
    assert resp.status == 400
    assert 'id="approve"' in await resp.text()


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"code_verifier": "x" * 43}, id="wrong verifier"),
        pytest.param({"code_verifier": "short"}, id="malformed verifier"),
        pytest.param({"redirect_uri": "http://127.0.0.1:5180/cb?tenant=a"}, id="other redirect"),
    ],
)
async def test_code_exchange_refuses_a_mismatch_with_invalid_grant(
    http: Http, quota: MockQuota, overrides: dict[str, str]
) -> None:
    verifier, challenge = make_pkce()
    code = await code_for(http, challenge)
    resp = await exchange(http, code, verifier, **overrides)
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_grant"
    assert quota.counters["token.errors"] == 1


async def test_code_exchange_refuses_a_code_issued_to_another_client(
    http: Http, quota: MockQuota
) -> None:
    other = quota.register_client(name="Other", redirect_uris=[REDIRECT_URI])
    verifier, challenge = make_pkce()
    code = await code_for(http, challenge)
    resp = await exchange(
        http, code, verifier, client_id=other.client_id, client_secret=other.client_secret
    )
    assert (await resp.json())["error"] == "invalid_grant"
    assert (await exchange(http, code, verifier)).status == 200


async def test_reused_code_is_refused_and_revokes_the_grant_it_produced(http: Http) -> None:
    verifier, challenge = make_pkce()
    code = await code_for(http, challenge)
    tokens = await (await exchange(http, code, verifier)).json()
    auth = {"Authorization": f"Bearer {tokens['access_token']}"}
    assert (await http.get("/v1/balance", headers=auth)).status == 200

    again = await exchange(http, code, verifier)
    assert again.status == 400
    assert (await again.json())["error"] == "invalid_grant"
    after = await http.get("/v1/balance", headers=auth)
    assert after.status == 401
    assert (await after.json())["error"]["code"] == "invalid_token"
    refresh = await http.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": "quota_client_test",
            "client_secret": "quota_secret_test",
        },
    )
    assert (await refresh.json())["error"] == "invalid_grant"


async def test_expired_code_is_refused(http: Http, clock: FakeClock) -> None:
    verifier, challenge = make_pkce()
    code = await code_for(http, challenge)
    clock.advance(60)
    resp = await exchange(http, code, verifier)
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_grant"


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"client_id": "quota_client_unknown"}, id="unknown client"),
        pytest.param({"client_secret": "wrong"}, id="bad secret"),
        pytest.param({"client_secret": ""}, id="no secret"),
    ],
)
async def test_token_endpoint_refuses_bad_client_authentication(
    http: Http, overrides: dict[str, str]
) -> None:
    verifier, challenge = make_pkce()
    code = await code_for(http, challenge)
    resp = await exchange(http, code, verifier, **overrides)
    assert resp.status == 401
    assert (await resp.json())["error"] == "invalid_client"


async def test_token_endpoint_accepts_http_basic_client_authentication(http: Http) -> None:
    verifier, challenge = make_pkce()
    code = await code_for(http, challenge)
    basic = base64.b64encode(b"quota_client_test:quota_secret_test").decode()
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
    }
    resp = await http.post("/oauth/token", data=form, headers={"Authorization": f"Basic {basic}"})
    assert resp.status == 200, await resp.text()


async def test_public_client_exchanges_a_code_without_a_secret(
    http: Http, quota: MockQuota
) -> None:
    public = quota.register_client(name="SPA", redirect_uris=[REDIRECT_URI], public=True)
    verifier, challenge = make_pkce()
    location = await approve(http, authorize_params(public.client_id, challenge))
    resp = await exchange(
        http, query_of(location)["code"], verifier, client_id=public.client_id, client_secret=""
    )
    assert resp.status == 200


@pytest.mark.parametrize(
    ("form", "status", "error"),
    [
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"grant_type": "authorization_code"}, 400, "invalid_request"),
        ({"grant_type": "refresh_token"}, 400, "invalid_request"),
        ({}, 400, "invalid_request"),
    ],
)
async def test_token_endpoint_refuses_incomplete_requests(
    http: Http, form: dict[str, str], status: int, error: str
) -> None:
    credentials = {"client_id": "quota_client_test", "client_secret": "quota_secret_test"}
    resp = await http.post("/oauth/token", data={**credentials, **form})
    assert resp.status == status
    assert (await resp.json())["error"] == error


async def test_token_endpoint_refuses_a_json_body(http: Http) -> None:
    resp = await http.post(
        "/oauth/token",
        json={"grant_type": "authorization_code", "client_id": "quota_client_test"},
    )
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_request"
