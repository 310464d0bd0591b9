"""Connect links the backend makes (GET /auth/quota/connect-url): one user, one use, ten minutes.

The pending state lives server-side (there is no cookie yet), so the callback must check that
the browser completing the link belongs to the user the link was made for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from yarl import URL

from tests.integration.conftest import Stack
from tests.integration.sidecars import Running, another_sidecar
from tests.support import approve_consent


@pytest.fixture
async def linked(stack: Stack, redis_url: str) -> AsyncIterator[Running]:
    """A sidecar with quota.redirect_uri set (a connect link needs it), on the stack's Redis."""
    async with another_sidecar(stack, store_spec=redis_url) as running:
        yield running


async def connect_url(
    stack: Stack, sidecar: Running, user: str, return_to: str | None = "/welcome"
) -> aiohttp.ClientResponse:
    params = {"user": user} if return_to is None else {"user": user, "return_to": return_to}
    return await stack.backend.get(f"{sidecar.internal_url}/auth/quota/connect-url", params=params)


async def follow_link(stack: Stack, sidecar: Running, user: str, signed_in_as: str) -> URL:
    """Make a link for ``user``, open it as ``signed_in_as``, approve; the callback URL Quota names."""
    made = await (await connect_url(stack, sidecar, user)).json()
    stack.browser.sign_in(sidecar.public_url, signed_in_as)
    consent = await stack.browser.get(made["url"])
    assert consent.status == 200, await consent.text()
    approved = await approve_consent(
        stack.browser, consent, f"{signed_in_as}@example.com", follow=False
    )
    assert approved.status == 302
    return URL(approved.headers["Location"])


async def call_back(stack: Stack, url: URL) -> tuple[str, str]:
    """Visit the callback; (where it redirected, the quota_error it carried or '')."""
    resp = await stack.browser.get(str(url), allow_redirects=False)
    assert resp.status == 302
    location = resp.headers["Location"]
    return location, parse_qs(urlsplit(location).query).get("quota_error", [""])[0]


async def test_a_connect_link_connects_the_user_it_was_made_for(
    stack: Stack, linked: Running
) -> None:
    resp = await connect_url(stack, linked, "alice")
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    made = await resp.json()
    assert made["expires_at"] == int(stack.clock()) + stack.config.session.pending_ttl_s
    query = parse_qs(urlsplit(made["url"]).query)
    assert made["url"].startswith(f"{stack.quota_url}/oauth/authorize?")
    assert query["redirect_uri"] == [linked.callback_url]
    assert query["code_challenge_method"] == ["S256"]
    assert not any(c.key.startswith("quota_sidecar-") for c in stack.browser.session.cookie_jar)

    location, error = await call_back(stack, await follow_link(stack, linked, "alice", "alice"))
    assert (location, error) == ("/welcome", "")
    record = await stack.store.get(stack.user_key("alice"))
    assert record is not None
    assert record.user_id == "alice"
    assert (await stack.chat("alice")).status == 200  # the stack's replica shares the store


async def test_a_connect_link_opened_by_another_signed_in_user_is_state_mismatch(
    stack: Stack, linked: Running
) -> None:
    url = await follow_link(stack, linked, "alice", signed_in_as="mallory")
    assert (await call_back(stack, url))[1] == "state_mismatch"
    assert await stack.store.get(stack.user_key("alice")) is None
    assert await stack.store.get(stack.user_key("mallory")) is None
    assert stack.quota.counters["token.authorization_code"] == 0


async def test_a_connect_link_used_twice_is_state_mismatch_and_keeps_the_first_connection(
    stack: Stack, linked: Running
) -> None:
    url = await follow_link(stack, linked, "alice", "alice")
    assert (await call_back(stack, url))[1] == ""
    first = await stack.store.get(stack.user_key("alice"))
    assert (await call_back(stack, url))[1] == "state_mismatch"
    assert await stack.store.get(stack.user_key("alice")) == first
    assert stack.quota.counters["token.authorization_code"] == 1


async def test_an_expired_connect_link_is_state_mismatch(stack: Stack, linked: Running) -> None:
    url = await follow_link(stack, linked, "alice", "alice")
    stack.clock.advance(stack.config.session.pending_ttl_s + 1)
    assert (await call_back(stack, url))[1] == "state_mismatch"
    assert await stack.store.get(stack.user_key("alice")) is None


async def test_a_connect_link_returns_only_to_a_same_origin_path(
    stack: Stack, linked: Running
) -> None:
    made = await (await connect_url(stack, linked, "alice", "https://evil.example/x")).json()
    stack.browser.sign_in(linked.public_url, "alice")
    consent = await stack.browser.get(made["url"])
    approved = await approve_consent(stack.browser, consent, "alice@example.com", follow=False)
    location, error = await call_back(stack, URL(approved.headers["Location"]))
    assert (location, error) == (stack.config.redirects.after_connect, "")


async def test_without_quota_redirect_uri_a_connect_link_is_409_public_url_unknown(
    stack: Stack,
) -> None:
    resp = await stack.backend.get(
        f"{stack.internal_url}/auth/quota/connect-url", params={"user": "alice"}
    )
    assert resp.status == 409
    error = (await resp.json())["error"]
    assert error["code"] == "public_url_unknown"
    assert "quota.redirect_uri" in error["message"]


async def test_a_connect_link_needs_a_user(stack: Stack, linked: Running) -> None:
    resp = await stack.backend.get(f"{linked.internal_url}/auth/quota/connect-url")
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "identity_invalid"
