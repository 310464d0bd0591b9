"""The demo in a real browser: sign in, connect a wallet on Quota's consent page, chat, disconnect.

Each test starts ``running_demo`` (emulator + demo host app + sidecar) on free ports and drives
Chromium through it as a person would, saving a screenshot per step.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import pytest

from sidecar.demo.runner import Demo, running_demo
from sidecar.mock_quota.wallets import normalize_email
from tests.e2e import flows
from tests.e2e.proxy import https_proxy

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext

    from tests.e2e.conftest import Shots

pytestmark = pytest.mark.e2e

EMAIL = "ada@example.com"
# Slow enough that an answer of 10 to 21 words takes a second or two to stream.
CHUNK_DELAY_S = 0.1


@pytest.fixture
async def demo() -> AsyncIterator[Demo]:
    async with running_demo(port=0, quota_port=0, app_port=0, internal_port=0) as running:
        running.quota.settings.chunk_delay_s = CHUNK_DELAY_S
        yield running


async def pending_cookie_secure(context: BrowserContext, demo: Demo) -> bool:
    """Whether the sidecar's cookie for the connect in flight is marked ``Secure``."""
    prefix = f"{demo.config.session.cookie_name}-"  # one cookie per round-trip
    [cookie] = [c for c in await context.cookies() if c.get("name", "").startswith(prefix)]
    assert cookie.get("httpOnly") is True
    assert cookie.get("sameSite") == "Lax"
    assert cookie.get("path") == "/auth/quota"
    return bool(cookie.get("secure"))


async def test_a_person_connects_chats_with_a_streamed_answer_and_disconnects(
    demo: Demo, browser: BrowserContext, shots: Shots
) -> None:
    page = await browser.new_page()
    await flows.sign_in(page, demo.url, "Ada Lovelace", shots)
    await flows.start_connect(page, demo.quota_url, shots)
    before = await flows.approve(page, demo.url, EMAIL, shots)
    assert before == "$5.00"

    answer = await flows.chat(page, "Summarise my notes about the analytical engine", shots)
    assert answer.text.startswith("Echo from Quota: Summarise my notes about the analytical")
    flows.assert_streamed(answer)
    await flows.expect(page.locator("#chat-cost")).to_contain_text("This answer cost")

    await flows.balance_drops(page, before, shots)
    assert demo.quota.balance(EMAIL) < 5_000_000
    await flows.disconnect(page, shots)
    await page.reload()
    await flows.expect(page.locator("#status")).to_have_text(flows.NOT_CONNECTED)
    await shots.take(page, "disconnected-after-reload")


async def test_denying_on_the_consent_page_shows_the_error_banner(
    demo: Demo, browser: BrowserContext, shots: Shots
) -> None:
    page = await browser.new_page()
    await flows.sign_in(page, demo.url, "Grace", shots)
    await flows.start_connect(page, demo.quota_url, shots)
    await flows.deny(page, demo.url, shots)
    await flows.expect(page.locator("#error")).to_contain_text("You declined")
    await flows.expect(page.locator("#status")).to_have_text(flows.NOT_CONNECTED)
    assert "quota_error" not in page.url, "the page tidies the error out of the address bar"
    assert demo.quota.counters["authorize.denied"] == 1
    assert demo.quota.counters["token.authorization_code"] == 0


@pytest.fixture(params=["http-localhost", "https-proxy"])
async def site(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[str, Demo, bool]]:
    """The demo as the browser sees it: plain ``http://localhost``, or behind an https proxy.

    Yields the URL to open, the demo, and whether its cookies must be ``Secure``.
    """
    behind_proxy = request.param == "https-proxy"
    overrides = {"session": {"trusted_proxies": ["127.0.0.1"]}} if behind_proxy else None
    async with running_demo(
        port=0, quota_port=0, app_port=0, internal_port=0, config_overrides=overrides
    ) as demo:
        demo.quota.settings.chunk_delay_s = 0
        if not behind_proxy:
            yield demo.url, demo, False
            return
        async with https_proxy(demo.url, tmp_path) as url:
            # Quota must know the callback the browser will come back to (exact match).
            client = demo.quota.clients[demo.config.quota.client_id]
            demo.quota.register_client(
                name=client.name,
                redirect_uris=[*client.redirect_uris, f"{url}/auth/quota/callback"],
                allowed_scopes=client.allowed_scopes,
                client_id=client.client_id,
                client_secret=client.client_secret,
            )
            yield url, demo, True


async def test_connect_works_and_cookies_are_secure_only_over_https(
    site: tuple[str, Demo, bool], browser: BrowserContext, shots: Shots
) -> None:
    url, demo, secure = site
    page = await browser.new_page()
    await flows.sign_in(page, url, "Linus", shots)
    await flows.start_connect(page, demo.quota_url, shots)
    assert await pending_cookie_secure(browser, demo) is secure
    [redirect_uri] = parse_qs(urlsplit(page.url).query)["redirect_uri"]
    assert redirect_uri == url + "/auth/quota/callback"
    before = await flows.approve(page, url, EMAIL, shots)
    answer = await flows.chat(page, "hello through the front door", shots)
    assert answer.text.startswith("Echo from Quota: hello through the front door")
    await flows.balance_drops(page, before, shots)
    await flows.disconnect(page, shots)
    assert demo.quota.counters["token.authorization_code"] == 1


async def test_two_tabs_connecting_at_once_both_end_connected(
    demo: Demo, browser: BrowserContext, shots: Shots
) -> None:
    first = await browser.new_page()
    await flows.sign_in(first, demo.url, "Margaret", shots)
    second = await browser.new_page()
    await second.goto(demo.url + "/")
    await flows.expect(second.locator("#status")).to_have_text(flows.NOT_CONNECTED)

    # Both tabs are on Quota's consent page before either approves.
    await flows.start_connect(first, demo.quota_url, shots, step="tab1-consent")
    await flows.start_connect(second, demo.quota_url, shots, step="tab2-consent")
    await flows.approve(first, demo.url, EMAIL, shots, step="tab1-connected")
    await flows.approve(second, demo.url, EMAIL, shots, step="tab2-connected")

    for page in (first, second):
        await page.reload()
        await flows.expect(page.locator("#status")).to_have_text(flows.CONNECTED)
        await flows.expect(page.locator("#error")).to_be_hidden()
    assert demo.quota.counters["authorize.approved"] == 2
    assert demo.quota.counters["token.authorization_code"] == 2
    assert normalize_email(EMAIL) in demo.quota.wallets.to_json()
