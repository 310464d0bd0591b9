"""The drop-in widget in a real browser: one script tag gives a host app connect, balance, top-up
and disconnect, without a line of Quota-specific code.

    Chromium ──► sidecar (public) ──► a bare host app page: <quota-wallet> and nothing else
                    └──► Quota emulator (consent, packages, checkout)
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest
from aiohttp import web

from tests.e2e.flows import DOLLARS, expect
from tests.e2e.hostapps import Front, free_port, sidecar_in_front_of

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext

    from tests.e2e.conftest import Shots

pytestmark = pytest.mark.e2e

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Widget host</title>
<script src="/auth/quota/widget.js" defer></script></head>
<body><h1>Plain host app</h1><quota-wallet return-to="/"></quota-wallet></body></html>
"""


def host_app() -> web.Application:
    """A host app that knows nothing of Quota: a sign-in cookie, the whoami endpoint, a page."""

    async def whoami(request: web.Request) -> web.Response:
        user = request.cookies.get("user")
        if not user:
            return web.json_response({"error": "not signed in"}, status=401)
        return web.json_response({"user": user}, headers={"X-Quota-User": user})

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/quota/whoami", whoami)
    app.router.add_get("/", page)
    return app


@contextlib.asynccontextmanager
async def widget_front() -> AsyncIterator[Front]:
    runner = web.AppRunner(host_app())
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        async with sidecar_in_front_of(f"http://127.0.0.1:{port}", free_port()) as front:
            yield front
    finally:
        await runner.cleanup()


async def test_the_widget_connects_shows_the_balance_tops_up_and_disconnects(
    browser: BrowserContext, shots: Shots
) -> None:
    async with widget_front() as front:
        await browser.add_cookies([{"name": "user", "value": "wendy", "url": front.url}])
        page = await browser.new_page()
        await page.goto(front.url + "/")
        connect = page.locator("quota-wallet [data-role='connect']")
        await expect(connect).to_be_visible()
        await expect(connect).to_have_text("Connect Quota Wallet")
        await shots.take(page, "not-connected")

        await connect.click()
        await page.wait_for_url(re.compile("^" + re.escape(front.quota_url)))
        await page.fill("#email", "wendy@example.com")
        await shots.take(page, "consent")
        await page.click("#approve")
        await page.wait_for_url(re.compile("^" + re.escape(front.url)))
        balance = page.locator("quota-wallet [data-role='balance']")
        await expect(balance).to_have_text(DOLLARS)
        before = await balance.text_content()
        await shots.take(page, "connected")

        buy = page.locator("quota-wallet quota-buy-credits")
        await expect(buy.locator("button")).to_be_visible()
        await expect(buy.locator("option")).not_to_have_count(0)
        await buy.locator("button").click()
        await page.wait_for_url(re.compile("^" + re.escape(front.quota_url) + "/checkout/"))
        await shots.take(page, "checkout")
        await page.get_by_role("button", name=re.compile("pay", re.IGNORECASE)).click()
        await page.wait_for_url(re.compile("^" + re.escape(front.url)))
        await expect(balance).not_to_have_text(before or "")
        await expect(balance).to_have_text(DOLLARS)
        await shots.take(page, "topped-up")

        await page.locator("quota-wallet [data-role='disconnect']").click()
        await expect(connect).to_be_visible()
        await expect(balance).to_be_hidden()
        await shots.take(page, "disconnected")


async def test_the_widget_offers_nothing_to_a_signed_out_visitor(
    browser: BrowserContext, shots: Shots
) -> None:
    async with widget_front() as front:
        page = await browser.new_page()
        await page.goto(front.url + "/")
        events = await page.evaluate(
            """() => new Promise((resolve) => {
                 const el = document.querySelector("quota-wallet");
                 el.addEventListener("quota-wallet:change", (e) => resolve(e.detail.state));
                 document.dispatchEvent(new Event("quota:refresh"));
               })"""
        )
        assert events == "signed_out"
        await expect(page.locator("quota-wallet [data-role='connect']")).to_be_hidden()
        await shots.take(page, "signed-out")
