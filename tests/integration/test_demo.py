"""``quota-sidecar demo`` wires emulator, demo app and sidecar so a person can connect and chat."""

from __future__ import annotations

import aiohttp

from sidecar.demo.runner import running_demo
from tests.support import approve_consent


async def test_the_demo_connects_a_wallet_streams_a_chat_and_shows_the_balance_drop() -> None:
    async with running_demo(port=0, quota_port=0, app_port=0, internal_port=0) as demo:
        demo.quota.settings.chunk_delay_s = 0
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as browser:
            page = await browser.get(demo.url)
            assert 'id="signin-name"' in await page.text()
            signed_in = await browser.post(f"{demo.url}/login", data={"name": "ada"})
            assert 'id="chat-input"' in await signed_in.text()
            consent = await browser.get(f"{demo.url}/auth/quota/connect?return_to=/")
            assert consent.status == 200
            assert 'id="approve"' in await consent.text()
            landed = await approve_consent(browser, consent, "ada@quota.local")  # type: ignore[arg-type]
            assert landed.status == 200
            assert str(landed.url).rstrip("/") == demo.url
            status = await (await browser.get(f"{demo.url}/auth/quota/status")).json()
            assert status["connected"] is True
            before = (await (await browser.get(f"{demo.url}/auth/quota/balance")).json())["balance"]

            chat = await browser.post(f"{demo.url}/api/chat", json={"message": "hello"})
            assert chat.status == 200
            body = await chat.text()
            assert "data: [DONE]" in body
            assert '"quota"' in body
            after = (await (await browser.get(f"{demo.url}/auth/quota/balance")).json())["balance"]
            assert after < before

            gone = await browser.post(
                f"{demo.url}/auth/quota/disconnect", headers={"Origin": demo.url}
            )
            assert await gone.json() == {"connected": False}
