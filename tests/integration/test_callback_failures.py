"""Every way the OAuth callback can fail ends at the error redirect, and stores nothing."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import pytest
from yarl import URL

from tests.integration.conftest import Stack
from tests.support import approve_consent


async def start_connect(stack: Stack, user: str = "alice") -> URL:
    """Run the flow up to Quota's redirect back; return the callback URL it names (not followed)."""
    stack.browser.sign_in(stack.public_url, user)
    consent = await stack.browser.get(f"{stack.public_url}/auth/quota/connect")
    assert consent.status == 200
    approved = await approve_consent(stack.browser, consent, f"{user}@example.com", follow=False)
    assert approved.status == 302
    return URL(approved.headers["Location"])


async def call_back(stack: Stack, url: URL | str) -> str:
    """Visit the callback; return the ``quota_error`` code it redirected with ('' if none)."""
    resp = await stack.browser.get(str(url), allow_redirects=False)
    assert resp.status == 302
    query = parse_qs(urlsplit(resp.headers["Location"]).query)
    return query.get("quota_error", [""])[0]


async def nothing_stored(stack: Stack, user: str = "alice") -> bool:
    return await stack.store.get(stack.user_key(user)) is None


async def test_callback_with_an_error_param_redirects_with_that_error(stack: Stack) -> None:
    await start_connect(stack)
    assert (
        await call_back(
            stack, f"{stack.public_url}/auth/quota/callback?error=access_denied&state=x"
        )
        == "access_denied"
    )
    assert await nothing_stored(stack)


async def test_denying_on_the_consent_page_ends_at_access_denied(stack: Stack) -> None:
    stack.browser.sign_in(stack.public_url, "alice")
    consent = await stack.browser.get(f"{stack.public_url}/auth/quota/connect")
    denied = await approve_consent(
        stack.browser, consent, "alice@example.com", decision="deny", follow=False
    )
    assert await call_back(stack, denied.headers["Location"]) == "access_denied"
    assert await nothing_stored(stack)


async def test_callback_error_param_that_is_not_a_code_is_not_reflected(stack: Stack) -> None:
    code = await call_back(stack, f"{stack.public_url}/auth/quota/callback?error=%3Cscript%3E")
    assert code == "access_denied"


@pytest.mark.parametrize("drop", ["code", "state"])
async def test_callback_missing_code_or_state_is_invalid_callback(stack: Stack, drop: str) -> None:
    url = await start_connect(stack)
    assert await call_back(stack, url.without_query_params(drop)) == "invalid_callback"
    assert await nothing_stored(stack)
    assert stack.quota.counters["token.authorization_code"] == 0


async def test_callback_with_a_different_state_is_state_mismatch(stack: Stack) -> None:
    url = await start_connect(stack)
    assert await call_back(stack, url.update_query(state="0" * 64)) == "state_mismatch"
    assert await nothing_stored(stack)


async def test_callback_after_the_pending_state_expired_is_state_mismatch(stack: Stack) -> None:
    url = await start_connect(stack)
    stack.clock.advance(stack.config.session.pending_ttl_s + 1)
    assert await call_back(stack, url) == "state_mismatch"
    assert await nothing_stored(stack)


async def test_replayed_callback_is_state_mismatch_and_keeps_the_first_connection(
    stack: Stack,
) -> None:
    url = await start_connect(stack)
    assert await call_back(stack, url) == ""
    first = await stack.store.get(stack.user_key("alice"))
    assert first is not None
    assert await call_back(stack, url) == "state_mismatch"
    assert await stack.store.get(stack.user_key("alice")) == first
    assert stack.quota.counters["token.authorization_code"] == 1


async def test_callback_without_the_cookie_is_state_mismatch(stack: Stack) -> None:
    url = await start_connect(stack)
    stack.browser.session.cookie_jar.clear(
        lambda c: c.key.startswith(f"{stack.config.session.cookie_name}-")
    )
    assert await call_back(stack, url) == "state_mismatch"
    assert await nothing_stored(stack)


async def test_user_changed_between_connect_and_callback_is_identity_changed(stack: Stack) -> None:
    url = await start_connect(stack, "alice")
    stack.browser.sign_in(stack.public_url, "mallory")
    assert await call_back(stack, url) == "identity_changed"
    assert await nothing_stored(stack, "alice")
    assert await nothing_stored(stack, "mallory")


async def test_signed_out_before_callback_is_identity_changed(stack: Stack) -> None:
    url = await start_connect(stack, "alice")
    stack.browser.sign_out(stack.public_url)
    assert await call_back(stack, url) == "identity_changed"
    assert await nothing_stored(stack)


@pytest.mark.parametrize(("status", "reason"), [(400, "invalid_grant"), (503, "server_error")])
async def test_token_exchange_failure_is_token_exchange_failed(
    stack: Stack, status: int, reason: str
) -> None:
    url = await start_connect(stack)
    stack.quota.settings.token_fail_status = status
    stack.quota.settings.token_fail_count = 1
    assert await call_back(stack, url) == "token_exchange_failed"
    assert await nothing_stored(stack)


async def test_a_code_from_another_flow_fails_the_exchange(stack: Stack) -> None:
    url = await start_connect(stack)
    assert await call_back(stack, url.update_query(code="forged-code")) == "token_exchange_failed"
    assert await nothing_stored(stack)


async def test_pending_state_is_cleared_after_a_failure(stack: Stack) -> None:
    url = await start_connect(stack)
    assert await call_back(stack, url.without_query_params("code")) == "invalid_callback"
    # The same state cannot be used again, even with the right code.
    assert await call_back(stack, url) == "state_mismatch"


async def test_two_tabs_connecting_at_once_both_complete(stack: Stack) -> None:
    first = await start_connect(stack)
    second = await start_connect(stack)
    assert await call_back(stack, first) == ""
    assert await call_back(stack, second) == ""
    assert stack.quota.counters["token.authorization_code"] == 2


async def test_two_tabs_clicking_connect_in_the_same_instant_both_complete(stack: Stack) -> None:
    """Both connect requests carry the same cookies; neither response may erase the other's."""
    stack.browser.sign_in(stack.public_url, "alice")
    connects = await asyncio.gather(
        *(
            stack.browser.get(f"{stack.public_url}/auth/quota/connect", allow_redirects=False)
            for _ in range(2)
        )
    )
    urls = []
    for connect in connects:
        consent = await stack.browser.get(connect.headers["Location"])
        approved = await approve_consent(stack.browser, consent, "alice@example.com", follow=False)
        urls.append(URL(approved.headers["Location"]))
    assert [await call_back(stack, url) for url in urls] == ["", ""]


async def test_a_browser_keeps_at_most_four_round_trips(stack: Stack) -> None:
    urls = []
    for _ in range(6):
        urls.append(await start_connect(stack))
        stack.clock.advance(1)
    ours = [
        c
        for c in stack.browser.session.cookie_jar
        if c.key.startswith(f"{stack.config.session.cookie_name}-")
    ]
    assert len(ours) == 4
    assert await call_back(stack, urls[0]) == "state_mismatch"  # the oldest went first
    assert await call_back(stack, urls[-1]) == ""
