"""Topping up in a real browser: the demo offers packages, Quota's checkout takes the payment.

Each test starts ``running_demo`` (emulator + demo host app + sidecar) on free ports and drives
Chromium through it: a low or empty wallet shows the packages, a click goes through the
sidecar to the emulator's checkout page, and Pay or Cancel comes back to the demo with a notice.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

from sidecar.demo.runner import Demo, running_demo
from tests.e2e import flows

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext, Page

    from tests.e2e.conftest import Shots

pytestmark = pytest.mark.e2e

EMAIL = "ada@example.com"


@pytest.fixture
async def demo() -> AsyncIterator[Demo]:
    async with running_demo(port=0, quota_port=0, app_port=0, internal_port=0) as running:
        running.quota.settings.chunk_delay_s = 0
        yield running


async def connected_with(page: Page, demo: Demo, shots: Shots, balance: int) -> None:
    """Signed in, wallet connected, then the wallet set to ``balance`` and the page reloaded."""
    await flows.sign_in(page, demo.url, "Ada", shots)
    await flows.start_connect(page, demo.quota_url, shots)
    await flows.approve(page, demo.url, EMAIL, shots)
    demo.quota.set_balance(EMAIL, balance)
    await page.reload()
    await flows.expect(page.locator("#status")).to_have_text(flows.CONNECTED)


async def to_checkout(page: Page, demo: Demo, shots: Shots) -> None:
    """Pick the first package; land on Quota's checkout page."""
    topup = page.locator("#topup")
    await flows.expect(topup).to_be_visible()
    starter = page.locator('#packages a[data-package="pkg_starter"]')
    await flows.expect(starter).to_contain_text("$5.00")
    await shots.take(page, "packages")
    await starter.click()
    await page.wait_for_url(re.compile("^" + re.escape(demo.quota_url + "/checkout/cs_")))
    await flows.expect(page.locator("#pay")).to_be_visible()
    await shots.take(page, "checkout")


async def test_a_low_balance_offers_packages_and_paying_brings_the_credits_back(
    demo: Demo, browser: BrowserContext, shots: Shots
) -> None:
    page = await browser.new_page()
    await connected_with(page, demo, shots, balance=500_000)
    await flows.expect(page.locator("#balance")).to_have_text("$0.50")
    await to_checkout(page, demo, shots)

    await page.click("#pay")
    await page.wait_for_url(demo.url + "/")  # the notice's parameters are tidied away
    await flows.expect(page.locator("#notice")).to_contain_text("Payment received")
    await flows.expect(page.locator("#balance")).to_have_text("$5.50")
    await flows.expect(page.locator("#topup")).to_be_hidden()
    # Quota's balance.updated, passed on by the sidecar, reaches the app and the page lists it.
    await flows.expect(page.locator("#events")).to_contain_text("balance.updated")
    await shots.take(page, "paid")
    assert demo.quota.balance(EMAIL) == 5_500_000


async def test_cancelling_at_the_checkout_comes_back_with_nothing_charged(
    demo: Demo, browser: BrowserContext, shots: Shots
) -> None:
    page = await browser.new_page()
    await connected_with(page, demo, shots, balance=500_000)
    await to_checkout(page, demo, shots)
    await page.click("#cancel")
    await page.wait_for_url(demo.url + "/")
    await flows.expect(page.locator("#notice")).to_contain_text("cancelled")
    await flows.expect(page.locator("#balance")).to_have_text("$0.50")
    await shots.take(page, "cancelled")
    assert demo.quota.balance(EMAIL) == 500_000


async def test_an_empty_wallet_refuses_the_chat_and_offers_a_topup(
    demo: Demo, browser: BrowserContext, shots: Shots
) -> None:
    page = await browser.new_page()
    await connected_with(page, demo, shots, balance=2_000_000)
    await flows.expect(page.locator("#topup")).to_be_hidden()  # $2: not low yet
    demo.quota.set_balance(EMAIL, 0)
    await page.fill("#chat-input", "Summarise my notes")
    await page.click("#chat-send")
    await flows.expect(page.locator("#error")).to_contain_text("top up")
    await flows.expect(page.locator("#topup-reason")).to_contain_text("empty")
    await flows.expect(page.locator("#packages a")).to_have_count(3)
    await shots.take(page, "empty-wallet")
