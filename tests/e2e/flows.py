"""What a person does on a host app's page, step by step, shared by every browser test.

The demo, the Express example and the Go example use the same element ids, so one set of steps
drives them all: ``#signin-name``/``#signin``, ``#user-name``, ``#status``, ``#balance``,
``#connect``, ``#disconnect``, ``#chat-input``/``#chat-send``/``#chat-output`` and ``#error``;
the emulator's consent page has ``#email``, ``#approve`` and ``#deny``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

try:
    from playwright.async_api import expect
except ImportError:  # the ``browser`` fixture skips or fails the test with the reason
    expect = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from playwright.async_api import Page

    from tests.e2e.conftest import Shots

CONNECTED = "Quota wallet connected"
NOT_CONNECTED = "Quota wallet not connected"
DOLLARS = re.compile(r"^-?\$[\d,]+\.\d\d$")
# How long one answer may take to finish streaming in the tests' setup.
ANSWER_TIMEOUT_MS = 15_000

# Records (ms since page load, text length) each time the answer's text changes.
_WATCH_GROWTH = """
(selector) => {
  const node = document.querySelector(selector);
  window.__growth = [];
  new MutationObserver(() => {
    window.__growth.push([performance.now(), node.textContent.length]);
  }).observe(node, { childList: true, characterData: true, subtree: true });
}
"""


@dataclass(frozen=True)
class Answer:
    text: str
    growth: list[tuple[float, int]]  # (ms, characters shown) at every change

    @property
    def partial_lengths(self) -> list[int]:
        """Distinct lengths shown before the whole answer was there."""
        final = len(self.text)
        return sorted({n for _, n in self.growth if 0 < n < final})

    @property
    def streaming_ms(self) -> float:
        """From the first characters on screen to the last."""
        shown = [t for t, n in self.growth if n > 0]
        return shown[-1] - shown[0] if shown else 0.0


def _url_starts(prefix: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(prefix))


async def sign_in(page: Page, base_url: str, name: str, shots: Shots) -> None:
    """Open the app signed out, sign in by name, see the wallet not yet connected."""
    await page.goto(base_url + "/")
    await expect(page.locator("#signin-name")).to_be_visible()
    await shots.take(page, "signed-out")
    await page.fill("#signin-name", name)
    await page.click("#signin")
    await expect(page.locator("#user-name")).to_have_text(name)
    await expect(page.locator("#status")).to_have_text(NOT_CONNECTED)
    await expect(page.locator("#connect")).to_be_visible()
    await shots.take(page, "signed-in")


async def start_connect(page: Page, quota_url: str, shots: Shots, step: str = "consent") -> None:
    """Click "Connect Quota Wallet" and arrive on Quota's consent page."""
    await page.click("#connect")
    await page.wait_for_url(_url_starts(quota_url + "/oauth/authorize?"))
    await expect(page.locator("#approve")).to_be_visible()
    await shots.take(page, step)


async def approve(
    page: Page, base_url: str, email: str, shots: Shots, step: str = "connected"
) -> str:
    """Approve on the consent page; back on the app, connected, the balance pill showing."""
    await page.fill("#email", email)
    await page.click("#approve")
    await page.wait_for_url(base_url + "/")
    await expect(page.locator("#status")).to_have_text(CONNECTED)
    balance = page.locator("#balance")
    await expect(balance).to_be_visible()
    await expect(balance).to_have_text(DOLLARS)
    await expect(page.locator("#error")).to_be_hidden()
    await shots.take(page, step)
    return await balance.inner_text()


async def deny(page: Page, base_url: str, shots: Shots) -> None:
    await page.click("#deny")
    await page.wait_for_url(_url_starts(base_url + "/"))
    await expect(page.locator("#error")).to_be_visible()
    await shots.take(page, "denied")


async def chat(page: Page, message: str, shots: Shots) -> Answer:
    """Send a question and watch the answer arrive; screenshots mid-stream and at the end."""
    output = page.locator("#chat-output")
    await page.evaluate(_WATCH_GROWTH, "#chat-output")
    await page.fill("#chat-input", message)
    await shots.take(page, "question")
    await page.click("#chat-send")
    await expect(output).to_have_text(re.compile(r"\S"))
    await shots.take(page, "answer-streaming")
    await expect(page.locator("#chat-send")).to_be_enabled(timeout=ANSWER_TIMEOUT_MS)
    text = await output.inner_text()
    growth = [(float(t), int(n)) for t, n in await page.evaluate("() => window.__growth")]
    await shots.take(page, "answer-complete")
    return Answer(text=text, growth=growth)


async def balance_drops(page: Page, before: str, shots: Shots) -> str:
    balance = page.locator("#balance")
    await expect(balance).not_to_have_text(before)
    await expect(balance).to_have_text(DOLLARS)
    after = await balance.inner_text()
    assert dollars(after) < dollars(before), (before, after)
    await shots.take(page, "balance-dropped")
    return after


async def disconnect(page: Page, shots: Shots) -> None:
    await page.click("#disconnect")
    await expect(page.locator("#status")).to_have_text(NOT_CONNECTED)
    await expect(page.locator("#connect")).to_be_visible()
    await expect(page.locator("#balance")).to_be_hidden()
    await shots.take(page, "disconnected")


def dollars(text: str) -> float:
    return float(text.replace("$", "").replace(",", ""))


def assert_streamed(answer: Answer, *, min_steps: int = 5, min_ms: float = 300) -> None:
    """The answer grew in several visible steps over time, not all at once."""
    assert answer.text.startswith("Echo from Quota:"), answer.text
    assert len(answer.partial_lengths) >= min_steps, answer.growth
    assert answer.streaming_ms >= min_ms, answer.growth
