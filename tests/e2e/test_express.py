"""The Express example (``examples/express``) behind the sidecar, driven in a real browser.

The app is plain Node: its own signed-cookie login, the identity endpoint, and the official
``openai`` npm SDK pointed at the sidecar's internal listener. ``npm ci`` must have run in the
example's folder (``scripts/e2e-deps`` does it).
"""

from __future__ import annotations

import re
import secrets
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest

from tests.e2e import flows
from tests.e2e.conftest import need
from tests.e2e.hostapps import Front, free_port, host_app_process, sidecar_in_front_of

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext

    from tests.e2e.conftest import Shots

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "express"
EMAIL = "ada@example.com"


@dataclass(frozen=True)
class ExpressSite:
    front: Front
    app_url: str  # the Express app itself, as only the sidecar should see it


@pytest.fixture
async def express(tmp_path: Path) -> AsyncIterator[ExpressSite]:
    node = shutil.which("node")
    need(node is not None, "node is not installed (apt-get install nodejs)")
    need(
        (EXAMPLE / "node_modules").is_dir(),
        "examples/express/node_modules is missing: run `npm ci` there (scripts/e2e-deps)",
    )
    assert node is not None
    app_port, internal_port = free_port(), free_port()
    async with (
        sidecar_in_front_of(f"http://127.0.0.1:{app_port}", internal_port) as front,
        host_app_process(
            [node, "server.js"],
            cwd=EXAMPLE,
            env={
                "PORT": str(app_port),
                "SIDECAR_INTERNAL_URL": front.internal_url,
                "COOKIE_SECRET": secrets.token_hex(32),
            },
            port=app_port,
            log_path=tmp_path / "express.log",
        ) as app_url,
    ):
        yield ExpressSite(front, app_url)


async def test_express_app_connects_a_wallet_and_streams_answers_paid_from_it(
    express: ExpressSite, browser: BrowserContext, shots: Shots
) -> None:
    front = express.front
    page = await browser.new_page()
    await flows.sign_in(page, front.url, "Ada", shots)

    # Before connecting, the SDK's 401 wallet_not_connected becomes words on the page.
    await page.fill("#chat-input", "hello before connecting")
    await page.click("#chat-send")
    await flows.expect(page.locator("#error")).to_contain_text("Connect your Quota wallet")
    await shots.take(page, "chat-before-connecting")

    await flows.start_connect(page, front.quota_url, shots)
    before = await flows.approve(page, front.url, EMAIL, shots)
    assert before == "$5.00"
    answer = await flows.chat(page, "Summarise my notes from the Express app", shots)
    assert answer.text.startswith("Echo from Quota: Summarise my notes from the Express app")
    flows.assert_streamed(answer)
    await flows.balance_drops(page, before, shots)
    assert front.quota.balance(EMAIL) < 5_000_000

    sdk_calls = [r for r in front.quota.requests if r.path == "/v1/chat/completions"]
    assert len(sdk_calls) == 1
    user_agent = next(v for k, v in sdk_calls[0].headers.items() if k.lower() == "user-agent")
    assert user_agent.startswith("OpenAI/JS"), user_agent

    await flows.disconnect(page, shots)


async def test_express_app_shows_the_denial_from_the_consent_page(
    express: ExpressSite, browser: BrowserContext, shots: Shots
) -> None:
    page = await browser.new_page()
    await flows.sign_in(page, express.front.url, "Grace", shots)
    await flows.start_connect(page, express.front.quota_url, shots)
    await flows.deny(page, express.front.url, shots)
    await flows.expect(page.locator("#error")).to_contain_text("You declined")
    await flows.expect(page.locator("#status")).to_have_text(flows.NOT_CONNECTED)


async def test_express_identity_endpoint_names_only_a_validly_signed_in_user(
    express: ExpressSite,
) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(express.app_url + "/quota/whoami") as resp:
            assert resp.status == 401
            assert "X-Quota-User" not in resp.headers
        forged = {"express_user": "s:mallory.forged-signature"}
        async with http.get(express.app_url + "/quota/whoami", cookies=forged) as resp:
            assert resp.status == 401
        async with http.post(
            express.app_url + "/login", data={"name": "Ada Lovelace"}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
            cookie = resp.cookies["express_user"]
            assert cookie["httponly"]
            assert re.fullmatch("lax", cookie["samesite"], re.IGNORECASE)
        async with http.get(express.app_url + "/quota/whoami") as resp:
            assert resp.status == 200
            assert resp.headers["X-Quota-User"] == "Ada%20Lovelace"
            assert resp.headers["Cache-Control"] == "no-store"
