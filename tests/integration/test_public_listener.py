"""The public listener: who the user is, the pending-state cookie, and the reverse proxy."""

from __future__ import annotations

from http.cookies import Morsel
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from tests.integration.conftest import Stack
from tests.support import IDENTITY_COOKIE


def pending_cookie(stack: Stack, resp: aiohttp.ClientResponse) -> Morsel[str]:
    """The one round-trip cookie a connect response sets (``<cookie_name>-<state prefix>``)."""
    ours = [
        m
        for name, m in resp.cookies.items()
        if name.startswith(f"{stack.config.session.cookie_name}-")
    ]
    assert len(ours) == 1, resp.cookies
    return ours[0]


async def test_connect_without_a_signed_in_user_is_401_not_signed_in(stack: Stack) -> None:
    resp = await stack.browser.get(f"{stack.public_url}/auth/quota/connect", allow_redirects=False)
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "not_signed_in"


@pytest.mark.parametrize("config_overrides", [{"redirects": {"login_url": "/login"}}])
async def test_connect_without_a_user_goes_to_the_login_url_when_configured(stack: Stack) -> None:
    resp = await stack.browser.get(
        f"{stack.public_url}/auth/quota/connect?return_to=/x", allow_redirects=False
    )
    assert resp.status == 302
    location = urlsplit(resp.headers["Location"])
    assert location.path == "/login"
    assert parse_qs(location.query)["return_to"] == ["/auth/quota/connect?return_to=/x"]


@pytest.mark.parametrize("name", ["X-Quota-User", "x-quota-user", "X_Quota_User", "x_quota_user"])
async def test_a_spoofed_identity_header_on_the_public_listener_names_no_one(
    stack: Stack, name: str
) -> None:
    await stack.connect("alice")
    stack.browser.sign_out(stack.public_url)
    for path in ("/auth/quota/connect", "/auth/quota/status", "/auth/quota/balance"):
        resp = await stack.browser.get(
            f"{stack.public_url}{path}", headers={name: "alice"}, allow_redirects=False
        )
        assert resp.status == 401, path
    resp = await stack.browser.post(
        f"{stack.public_url}/auth/quota/disconnect", headers={name: "alice"}
    )
    assert resp.status == 401
    assert await stack.store.get(stack.user_key("alice")) is not None


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Quota-User": "alice"},
        {"x_quota_user": "alice"},
        {"Connection": "X-Quota-User", "X-Quota-User": "alice"},
    ],
)
async def test_the_identity_header_never_reaches_the_upstream(
    stack: Stack, headers: dict[str, str]
) -> None:
    resp = await stack.browser.get(f"{stack.public_url}/page", headers=headers)
    assert resp.status == 200
    seen = stack.upstream.requests[-1].headers
    assert not any(k.lower().replace("_", "-") == "x-quota-user" for k in seen)


async def test_the_sidecar_cookie_never_reaches_the_upstream(stack: Stack) -> None:
    stack.browser.sign_in(stack.public_url, "alice")
    resp = await stack.browser.get(f"{stack.public_url}/auth/quota/connect", allow_redirects=False)
    assert pending_cookie(stack, resp)
    # Send the sidecar cookie to a proxied path too (a browser scoped it, a client may not).
    resp = await stack.browser.get(
        f"{stack.public_url}/page",
        headers={
            "Cookie": f"{stack.config.session.cookie_name}=abc; {IDENTITY_COOKIE}=alice; other=1"
        },
    )
    assert resp.status == 200
    cookies = {
        part.strip()
        for header in stack.upstream.requests[-1].headers["Cookie"]
        for part in header.split(";")
    }
    assert cookies == {f"{IDENTITY_COOKIE}=alice", "other=1"}


async def test_pending_cookie_is_httponly_lax_scoped_and_not_secure_on_http(stack: Stack) -> None:
    stack.browser.sign_in(stack.public_url, "alice")
    resp = await stack.browser.get(f"{stack.public_url}/auth/quota/connect", allow_redirects=False)
    morsel = pending_cookie(stack, resp)
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Lax"
    assert morsel["path"] == "/auth/quota"
    assert not morsel["secure"]
    assert int(morsel["max-age"]) == stack.config.session.pending_ttl_s


@pytest.mark.parametrize("config_overrides", [{"session": {"trusted_proxies": ["127.0.0.1"]}}])
async def test_https_from_a_trusted_proxy_makes_the_cookie_secure_and_the_callback_https(
    stack: Stack,
) -> None:
    stack.browser.sign_in(stack.public_url, "alice")
    resp = await stack.browser.get(
        f"{stack.public_url}/auth/quota/connect",
        headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "app.example.com"},
        allow_redirects=False,
    )
    assert pending_cookie(stack, resp)["secure"] is True
    redirect_uri = parse_qs(urlsplit(resp.headers["Location"]).query)["redirect_uri"][0]
    assert redirect_uri == "https://app.example.com/auth/quota/callback"


async def test_forwarded_headers_from_an_untrusted_peer_are_ignored(stack: Stack) -> None:
    stack.browser.sign_in(stack.public_url, "alice")
    resp = await stack.browser.get(
        f"{stack.public_url}/auth/quota/connect",
        headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"},
        allow_redirects=False,
    )
    redirect_uri = parse_qs(urlsplit(resp.headers["Location"]).query)["redirect_uri"][0]
    assert redirect_uri == f"{stack.public_url}/auth/quota/callback"
    assert not pending_cookie(stack, resp)["secure"]
    await stack.browser.get(
        f"{stack.public_url}/page",
        headers={"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil.example"},
    )
    seen = stack.upstream.requests[-1].headers
    assert seen["X-Forwarded-For"] == ["127.0.0.1"]
    assert seen["X-Forwarded-Host"] == [stack.public_url.removeprefix("http://")]
    assert seen["X-Forwarded-Proto"] == ["http"]


@pytest.mark.parametrize(
    ("return_to", "lands_on"),
    [
        ("/notes?id=3", "/notes?id=3"),
        ("/", "/"),
        ("//evil.example/x", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("\\\\evil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("/%0d%0aSet-Cookie:x=1", "/%0d%0aSet-Cookie:x=1"),  # stays encoded: no header split
        ("/\r\nSet-Cookie: x=1", "/"),
        ("/\x00x", "/"),
        ("evil.example", "/"),
        ("", "/"),
    ],
)
async def test_return_to_accepts_only_same_origin_paths(
    stack: Stack, return_to: str, lands_on: str
) -> None:
    stack.browser.sign_in(stack.public_url, "alice")
    consent = await stack.browser.get(
        f"{stack.public_url}/auth/quota/connect", params={"return_to": return_to}
    )
    from tests.support import approve_consent

    approved = await approve_consent(stack.browser, consent, "alice@example.com", follow=False)
    final = await stack.browser.get(approved.headers["Location"], allow_redirects=False)
    assert final.status == 302
    assert final.headers["Location"] == lands_on


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "null"},
    ],
)
async def test_disconnect_from_another_site_is_refused(
    stack: Stack, headers: dict[str, str]
) -> None:
    await stack.connect("alice")
    resp = await stack.browser.post(f"{stack.public_url}/auth/quota/disconnect", headers=headers)
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "forbidden_origin"
    assert await stack.store.get(stack.user_key("alice")) is not None


async def test_disconnect_from_the_app_itself_forgets_and_revokes(stack: Stack) -> None:
    await stack.connect("alice")
    resp = await stack.browser.post(
        f"{stack.public_url}/auth/quota/disconnect",
        headers={"Origin": stack.public_url, "Sec-Fetch-Site": "same-origin"},
    )
    assert resp.status == 200
    assert await resp.json() == {"connected": False}
    assert await stack.store.get(stack.user_key("alice")) is None
    assert stack.quota.counters["revoke"] == 1
    status = await stack.browser.get(f"{stack.public_url}/auth/quota/status")
    assert (await status.json())["connected"] is False


async def test_disconnect_is_post_only(stack: Stack) -> None:
    stack.browser.sign_in(stack.public_url, "alice")
    resp = await stack.browser.get(f"{stack.public_url}/auth/quota/disconnect")
    assert resp.status == 405
    assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_status_when_signed_out_is_401_and_when_signed_in_is_not_connected(
    stack: Stack,
) -> None:
    resp = await stack.browser.get(f"{stack.public_url}/auth/quota/status")
    assert resp.status == 401
    stack.browser.sign_in(stack.public_url, "alice")
    resp = await stack.browser.get(f"{stack.public_url}/auth/quota/status")
    assert await resp.json() == {
        "connected": False,
        "scopes": [],
        "expires_at": None,
        "state": "not_connected",
        "needs_reconnect": False,
    }
    assert resp.headers["Cache-Control"] == "no-store"


async def test_balance_without_a_wallet_is_401_wallet_not_connected(stack: Stack) -> None:
    stack.browser.sign_in(stack.public_url, "alice")
    resp = await stack.browser.get(f"{stack.public_url}/auth/quota/balance")
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "wallet_not_connected"


async def test_unknown_auth_path_is_a_404_from_the_sidecar(stack: Stack) -> None:
    before = len(stack.upstream.requests)
    resp = await stack.browser.get(f"{stack.public_url}/auth/quota/nope")
    assert resp.status == 404
    assert len(stack.upstream.requests) == before


async def test_proxy_passes_method_path_query_and_body(stack: Stack) -> None:
    payload = b"x" * 200_000
    resp = await stack.browser.post(f"{stack.public_url}/api/notes?a=1&b=%20", data=payload)
    assert resp.status == 200
    assert resp.headers["X-Stub"] == "yes"
    assert "X-Request-Id" in resp.headers
    seen = stack.upstream.requests[-1]
    assert (seen.method, seen.path_qs, seen.body) == ("POST", "/api/notes?a=1&b=%20", payload)


async def test_upstream_down_is_502_upstream_unavailable(stack: Stack) -> None:
    from dataclasses import replace

    from sidecar.config import UpstreamConfig
    from tests.integration.conftest import free_port

    object.__setattr__(
        stack.services,
        "config",
        replace(stack.config, upstream=UpstreamConfig(url=f"http://127.0.0.1:{free_port()}")),
    )
    resp = await stack.browser.get(f"{stack.public_url}/page")
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_unavailable"
    resp = await stack.browser.get(f"{stack.public_url}/auth/quota/status")
    assert resp.status == 502


async def test_request_id_is_taken_from_the_client_or_made(stack: Stack) -> None:
    resp = await stack.browser.get(f"{stack.public_url}/page", headers={"X-Request-Id": "abc-123"})
    assert resp.headers["X-Request-Id"] == "abc-123"
    resp = await stack.browser.get(
        f"{stack.public_url}/page", headers={"X-Request-Id": "bad id\x01"[:6]}
    )
    assert resp.headers["X-Request-Id"] != "bad id"


@pytest.mark.parametrize("config_overrides", [{"limits": {"max_body_bytes": 1000}}])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_over_the_limit_is_413_and_counted_even_when_streamed(
    stack: Stack, framing: str
) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"z" * 500

    data = b"z" * 5000 if framing == "content-length" else chunks()
    before = len(stack.upstream.requests)
    resp = await stack.browser.post(f"{stack.public_url}/upload", data=data)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"
    assert len(stack.upstream.requests) == before  # the app saw no complete request
    ok = await stack.browser.post(f"{stack.public_url}/upload", data=b"z" * 1000)
    assert ok.status == 200


@pytest.mark.parametrize("config_overrides", [{"limits": {"max_header_count": 20}}])
async def test_too_many_headers_are_refused_before_anything_is_proxied(stack: Stack) -> None:
    before = len(stack.upstream.requests)
    resp = await stack.browser.get(
        f"{stack.public_url}/page", headers={f"X-H{i}": "v" for i in range(40)}
    )
    assert resp.status in (400, 431)
    assert len(stack.upstream.requests) == before


async def test_an_oversize_header_is_refused(stack: Stack) -> None:
    resp = await stack.browser.get(f"{stack.public_url}/page", headers={"X-Big": "v" * 20000})
    assert resp.status in (400, 431)


@pytest.mark.parametrize("config_overrides", [{"upstream": {"host_header": "rewrite"}}])
async def test_host_can_be_rewritten_to_the_upstreams_own(stack: Stack) -> None:
    await stack.browser.get(f"{stack.public_url}/page")
    seen = stack.upstream.requests[-1].headers
    assert seen["Host"] == [stack.upstream_url.removeprefix("http://")]
    assert seen["X-Forwarded-Host"] == [stack.public_url.removeprefix("http://")]


async def test_the_browsers_host_is_passed_by_default(stack: Stack) -> None:
    await stack.browser.get(f"{stack.public_url}/page")
    assert stack.upstream.requests[-1].headers["Host"] == [stack.public_url.removeprefix("http://")]
