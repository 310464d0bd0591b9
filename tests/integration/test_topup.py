"""Top-ups over real HTTP: the browser goes to the emulator's checkout, pays or cancels, comes back.

Also the package list, the refusals (bad package, signed out, no wallet, an unsafe return_to)
and the ``X-Quota-Topup-Url`` hint on Quota's 402 ``insufficient_credits``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from sidecar.demo.runner import running_demo
from sidecar.errors import TopupUnavailable
from sidecar.mock_quota.checkouts import PACKAGES
from sidecar.routes.topup import TOPUP_URL_HEADER, checked_checkout_url
from tests.integration.conftest import Stack
from tests.support import approve_consent, make_tokens

BROWSER_NAVIGATION = {"Sec-Fetch-Mode": "navigate", "Accept": "text/html"}
PUBLIC_ORIGIN = "https://notes.example.com"


async def balance(stack: Stack) -> int:
    async with await stack.browser.get(f"{stack.public_url}/auth/quota/balance") as resp:
        assert resp.status == 200, await resp.text()
        value: int = (await resp.json())["balance"]
        return value


async def start_topup(stack: Stack, query: str, **kw: Any) -> aiohttp.ClientResponse:
    return await stack.browser.get(
        f"{stack.public_url}/auth/quota/topup?{query}", allow_redirects=False, **kw
    )


async def checkout_of(stack: Stack, query: str) -> str:
    """Start a top-up; the checkout page URL the sidecar sent the browser to."""
    resp = await start_topup(stack, query)
    assert resp.status == 303, await resp.text()
    assert resp.headers["Cache-Control"] == "no-store"
    return resp.headers["Location"]


async def error_of(resp: aiohttp.ClientResponse) -> tuple[int, str]:
    body = await resp.json()
    return resp.status, body["error"]["code"]


# --- the round trip -----------------------------------------------------------------------


async def test_a_connected_user_pays_at_quotas_checkout_and_comes_back_credited(
    stack: Stack,
) -> None:
    await stack.connect("ada")
    before = await balance(stack)
    checkout = await checkout_of(stack, "package=pkg_starter")
    assert checkout.startswith(f"{stack.quota_url}/checkout/cs_")

    page = await stack.browser.get(checkout)
    assert page.status == 200
    assert "Starter" in await page.text()

    paid = await stack.browser.post(f"{checkout}/pay", allow_redirects=False)
    assert paid.status == 303
    back = urlsplit(paid.headers["Location"])
    assert f"{back.scheme}://{back.netloc}{back.path}" == f"{stack.public_url}/"
    query = parse_qs(back.query)
    assert query["quota_topup"] == ["success"]
    assert query["checkout_session"] == [checkout.rsplit("/", 1)[1]]

    landed = await stack.browser.get(paid.headers["Location"])  # the app's own page, proxied
    assert landed.status == 200
    assert await balance(stack) == before + 5_000_000
    started = stack.services.metrics.registry.get_sample_value("quota_sidecar_topups_started_total")
    assert started == 1


async def test_cancelling_at_the_checkout_comes_back_to_the_cancel_path_with_nothing_charged(
    stack: Stack,
) -> None:
    await stack.connect("ada")
    before = await balance(stack)
    checkout = await checkout_of(stack, "package=pkg_pro")
    cancelled = await stack.browser.post(f"{checkout}/cancel", allow_redirects=False)
    assert cancelled.status == 303
    assert cancelled.headers["Location"] == f"{stack.public_url}/?quota_topup=cancelled"
    assert await balance(stack) == before


async def test_a_same_origin_return_to_is_where_the_browser_comes_back(stack: Stack) -> None:
    await stack.connect("ada")
    checkout = await checkout_of(stack, "package=pkg_starter&return_to=%2Fbilling%3Ftab%3D2")
    session = stack.quota.checkouts.get(checkout.rsplit("/", 1)[1])
    assert session is not None
    assert session.success_url == f"{stack.public_url}/billing?tab=2&quota_topup=success"
    assert session.cancel_url == f"{stack.public_url}/billing?tab=2&quota_topup=cancelled"


@pytest.mark.parametrize(
    "return_to",
    [
        "//evil.example/steal",
        "https://evil.example/steal",
        "/\\evil.example/steal",
        "javascript:alert(1)",
        "/ok\r\nSet-Cookie: x=1",
        "evil",
    ],
)
async def test_an_unsafe_return_to_is_ignored_for_the_default_paths(
    stack: Stack, return_to: str
) -> None:
    await stack.connect("ada")
    resp = await stack.browser.get(
        f"{stack.public_url}/auth/quota/topup",
        params={"package": "pkg_starter", "return_to": return_to},
        allow_redirects=False,
    )
    assert resp.status == 303
    session = stack.quota.checkouts.get(resp.headers["Location"].rsplit("/", 1)[1])
    assert session is not None
    assert session.success_url == f"{stack.public_url}/?quota_topup=success"
    assert session.cancel_url == f"{stack.public_url}/?quota_topup=cancelled"


@pytest.mark.parametrize(
    "config_overrides", [{"topup": {"success_path": "/wallet?paid=1", "cancel_path": "/wallet"}}]
)
async def test_the_configured_paths_are_used_without_return_to(stack: Stack) -> None:
    await stack.connect("ada")
    checkout = await checkout_of(stack, "package=pkg_starter")
    session = stack.quota.checkouts.get(checkout.rsplit("/", 1)[1])
    assert session is not None
    assert session.success_url == f"{stack.public_url}/wallet?paid=1"
    assert session.cancel_url == f"{stack.public_url}/wallet"


async def test_an_access_token_quota_refuses_gets_one_forced_refresh(stack: Stack) -> None:
    await stack.connect("ada")
    record = await stack.store.get(stack.user_key("ada"))
    assert record is not None
    async with stack.backend.post(
        f"{stack.quota_url}/oauth/revoke",
        data={
            "token": record.access_token,
            "token_type_hint": "access_token",
            "client_id": stack.client.client_id,
            "client_secret": stack.client.client_secret,
        },
    ) as revoked:
        assert revoked.status == 200
    checkout = await checkout_of(stack, "package=pkg_starter")
    assert checkout.startswith(f"{stack.quota_url}/checkout/cs_")
    assert stack.quota.counters["token.refresh_token"] == 1


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize("package", ["", "../v1/balance", "pkg starter", "p" * 65, "pkg_é"])
async def test_a_malformed_package_id_is_400_invalid_package_before_quota_is_asked(
    stack: Stack, package: str
) -> None:
    await stack.connect("ada")
    resp = await stack.browser.get(
        f"{stack.public_url}/auth/quota/topup", params={"package": package}, allow_redirects=False
    )
    assert await error_of(resp) == (400, "invalid_package")
    assert stack.quota.counters["checkout.created"] == 0


async def test_a_package_quota_does_not_know_is_400_invalid_package(stack: Stack) -> None:
    await stack.connect("ada")
    resp = await start_topup(stack, "package=pkg_unknown")
    assert await error_of(resp) == (400, "invalid_package")


async def test_without_a_wallet_an_api_client_gets_401_wallet_not_connected(stack: Stack) -> None:
    stack.browser.sign_in(stack.public_url, "ada")
    resp = await start_topup(stack, "package=pkg_starter")
    assert await error_of(resp) == (401, "wallet_not_connected")


async def test_without_a_wallet_a_browser_lands_on_the_error_page(stack: Stack) -> None:
    stack.browser.sign_in(stack.public_url, "ada")
    resp = await start_topup(stack, "package=pkg_starter", headers=BROWSER_NAVIGATION)
    assert resp.status == 303
    assert resp.headers["Location"] == "/?quota_error=wallet_not_connected"


async def test_signed_out_is_401_for_an_api_client_and_the_error_page_for_a_browser(
    stack: Stack,
) -> None:
    resp = await start_topup(stack, "package=pkg_starter")
    assert await error_of(resp) == (401, "not_signed_in")
    page = await start_topup(stack, "package=pkg_starter", headers={"Accept": "text/html"})
    assert page.status == 303
    assert page.headers["Location"] == "/?quota_error=not_signed_in"


@pytest.mark.parametrize("config_overrides", [{"redirects": {"login_url": "/login"}}])
async def test_signed_out_browsers_go_to_the_login_page_and_back(stack: Stack) -> None:
    resp = await start_topup(stack, "package=pkg_starter", headers=BROWSER_NAVIGATION)
    assert resp.status == 303
    assert resp.headers["Location"] == (
        "/login?return_to=%2Fauth%2Fquota%2Ftopup%3Fpackage%3Dpkg_starter"
    )


async def test_another_sites_image_tag_cannot_open_a_checkout_in_the_users_name(
    stack: Stack,
) -> None:
    await stack.connect("ada")
    embedded = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
    resp = await start_topup(stack, "package=pkg_starter", headers=embedded)
    assert await error_of(resp) == (403, "forbidden_origin")
    assert stack.quota.counters["checkout.created"] == 0
    # A link from another site is a navigation: the user lands on the checkout and decides.
    linked = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert (await start_topup(stack, "package=pkg_starter", headers=linked)).status == 303


async def test_a_post_to_the_topup_path_is_405(stack: Stack) -> None:
    resp = await stack.browser.post(f"{stack.public_url}/auth/quota/topup?package=pkg_starter")
    assert await error_of(resp) == (405, "method_not_allowed")


@pytest.mark.parametrize(
    ("url", "base", "ok"),
    [
        ("https://checkout.usequota.ai/cs_1", "https://api.usequota.ai", True),
        ("http://checkout.usequota.ai/cs_1", "https://api.usequota.ai", False),
        ("http://127.0.0.1:5181/checkout/cs_1", "http://127.0.0.1:5181", True),
        ("javascript:alert(1)", "http://127.0.0.1:5181", False),
        ("https:///no-host", "https://api.usequota.ai", False),
        ("/checkout/cs_1", "https://api.usequota.ai", False),
        ("https://checkout.usequota.ai/a b", "https://api.usequota.ai", False),
        ("https://checkout.usequota.ai/\r\nSet-Cookie: x", "https://api.usequota.ai", False),
    ],
)
def test_only_an_absolute_https_checkout_url_is_followed(url: str, base: str, ok: bool) -> None:
    if ok:
        assert checked_checkout_url(url, base) == url
    else:
        with pytest.raises(TopupUnavailable):
            checked_checkout_url(url, base)


# --- the package list ---------------------------------------------------------------------


async def test_the_package_list_is_quotas_passed_through_and_cached_for_a_minute(
    stack: Stack,
) -> None:
    async with aiohttp.ClientSession() as anonymous:  # no sign-in needed
        first = await anonymous.get(f"{stack.public_url}/auth/quota/packages")
        assert first.status == 200
        assert first.headers["Cache-Control"] == "private, max-age=60"
        body = await first.json()
        assert [p["id"] for p in body["data"]] == [p.id for p in PACKAGES]
        async with anonymous.get(f"{stack.quota_url}/v1/packages") as direct:
            assert await first.read() == await direct.read()
        await anonymous.get(f"{stack.public_url}/auth/quota/packages")
        assert stack.quota.counters["packages"] == 2  # ours once, the direct call once
        stack.clock.advance(61)
        again = await anonymous.get(f"{stack.public_url}/auth/quota/packages")
        assert again.status == 200
        assert stack.quota.counters["packages"] == 3


@pytest.mark.parametrize("config_overrides", [{"quota": {"base_url": "http://127.0.0.1:9"}}])
async def test_the_package_list_is_502_quota_unavailable_when_quota_is_down(
    stack: Stack,
) -> None:
    resp = await stack.browser.get(f"{stack.public_url}/auth/quota/packages")
    assert await error_of(resp) == (502, "quota_unavailable")


# --- the 402 hint -------------------------------------------------------------------------


async def drained(stack: Stack, user: str = "ada") -> None:
    """``user`` connected (a grant issued straight by the emulator) with an empty wallet."""
    email = f"{user}@example.com"
    tokens = stack.quota.issue_grant(stack.client.client_id, email)
    record = make_tokens(now=stack.clock())
    record = dataclasses.replace(
        record,
        access_token=tokens["access_token"],
        refresh_token=tokens["refresh_token"],
    )
    await stack.store.put(stack.user_key(user), record)
    stack.quota.set_balance(email, 0)


async def quota_402_body(stack: Stack, *, stream: bool) -> bytes:
    """What the emulator itself answers the same call with the same token."""
    record = await stack.store.get(stack.user_key("ada"))
    assert record is not None
    async with stack.backend.post(
        f"{stack.quota_url}/v1/chat/completions",
        json={
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hello there"}],
            "stream": stream,
        },
        headers={"Authorization": f"Bearer {record.access_token}"},
    ) as direct:
        assert direct.status == 402
        return await direct.read()


@pytest.mark.parametrize("config_overrides", [{"topup": {"public_url": PUBLIC_ORIGIN}}])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_402_insufficient_credits_carries_the_topup_url_and_quotas_exact_body(
    stack: Stack, stream: bool
) -> None:
    await drained(stack)
    resp = await stack.chat("ada", stream=stream)
    assert resp.status == 402
    assert resp.headers[TOPUP_URL_HEADER] == f"{PUBLIC_ORIGIN}/auth/quota/topup"
    body = await resp.read()
    assert json.loads(body)["error"]["code"] == "insufficient_credits"
    assert body == await quota_402_body(stack, stream=stream)
    assert resp.headers["Content-Length"] == str(len(body))


@pytest.mark.parametrize(
    "config_overrides",
    [{"quota": {"redirect_uri": "https://app.example.org/auth/quota/callback"}}],
)
async def test_the_topup_url_takes_the_origin_of_the_redirect_uri(stack: Stack) -> None:
    await drained(stack)
    resp = await stack.chat("ada")
    assert resp.status == 402
    assert resp.headers[TOPUP_URL_HEADER] == "https://app.example.org/auth/quota/topup"


async def test_with_no_known_public_origin_the_402_passes_unchanged_without_the_header(
    stack: Stack,
) -> None:
    await drained(stack)
    resp = await stack.chat("ada")
    assert resp.status == 402
    assert TOPUP_URL_HEADER not in resp.headers
    assert await resp.read() == await quota_402_body(stack, stream=False)


def test_a_missing_public_origin_is_logged_once_at_start(caplog: pytest.LogCaptureFixture) -> None:
    from sidecar.routes.topup import note_topup_origin
    from tests.support import make_config

    with caplog.at_level(logging.INFO, logger="sidecar.routes.topup"):
        note_topup_origin(make_config())
        note_topup_origin(make_config(topup={"public_url": PUBLIC_ORIGIN}))
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "topup.public_url" in caplog.records[0].getMessage()


@pytest.mark.parametrize("config_overrides", [{"topup": {"public_url": PUBLIC_ORIGIN}}])
async def test_other_quota_errors_get_no_topup_url(stack: Stack) -> None:
    await stack.connect("ada")
    resp = await stack.chat("ada", model="no-such-model")
    assert resp.status >= 400
    assert TOPUP_URL_HEADER not in resp.headers


# --- the demo -----------------------------------------------------------------------------


async def test_the_demo_offers_a_topup_on_402_and_the_paid_credits_come_back_as_an_event() -> None:
    async with running_demo(port=0, quota_port=0, app_port=0, internal_port=0) as demo:
        demo.quota.settings.chunk_delay_s = 0
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            await browser.post(f"{demo.url}/login", data={"name": "ada"})
            consent = await browser.get(f"{demo.url}/auth/quota/connect?return_to=/")
            assert (await approve_consent(browser, consent, "ada@quota.local")).status == 200  # type: ignore[arg-type]
            demo.quota.set_balance("ada@quota.local", 0)

            empty = await browser.post(f"{demo.url}/api/chat", json={"message": "hello"})
            assert empty.status == 402
            assert empty.headers[TOPUP_URL_HEADER] == f"{demo.url}/auth/quota/topup"
            assert (await empty.json())["error"]["code"] == "insufficient_credits"

            listed = await (await browser.get(f"{demo.url}/auth/quota/packages")).json()
            starter = listed["data"][0]["id"]
            checkout = await browser.get(
                f"{demo.url}/auth/quota/topup", params={"package": starter, "return_to": "/"}
            )
            assert checkout.status == 200
            assert str(checkout.url).startswith(f"{demo.quota_url}/checkout/cs_")
            home = await browser.post(f"{checkout.url}/pay")
            assert home.status == 200
            assert str(home.url).startswith(f"{demo.url}/?quota_topup=success&checkout_session=")
            assert 'id="notice"' in await home.text()
            balance = await (await browser.get(f"{demo.url}/auth/quota/balance")).json()
            assert balance["balance"] == 5_000_000

            deadline = time.monotonic() + 5
            while True:
                async with browser.get(f"{demo.url}/api/events") as resp:
                    events = (await resp.json())["events"]
                if any(e["type"] == "balance.updated" for e in events):
                    break
                assert time.monotonic() < deadline, "balance.updated never reached the demo app"
                await asyncio.sleep(0.05)
