"""The Go example (``examples/go``, standard library only) behind the sidecar, in a real browser.

The test builds it with the local Go toolchain (Debian's ``golang-go``; nothing is downloaded:
the module has no dependencies and the build runs with ``GOPROXY=off``), runs the binary on a
free port and walks the same steps as the demo's and the Express example's tests.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
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

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "go"
EMAIL = "ken@example.com"
BUILD_TIMEOUT_S = 300


@pytest.fixture
def go_binary(tmp_path: Path) -> Path:
    go = shutil.which("go")
    need(go is not None, "the Go toolchain is not installed (apt-get install golang-go)")
    assert go is not None
    binary = tmp_path / "go-host-app"
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": ""}
    if not {"GOCACHE", "XDG_CACHE_HOME", "HOME"} & set(env):
        env["GOCACHE"] = str(tmp_path / "go-cache")  # go refuses to build without a cache
    build = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    return binary


@pytest.fixture
async def go_site(go_binary: Path, tmp_path: Path) -> AsyncIterator[tuple[Front, str]]:
    app_port, internal_port = free_port(), free_port()
    async with (
        sidecar_in_front_of(f"http://127.0.0.1:{app_port}", internal_port) as front,
        host_app_process(
            [str(go_binary)],
            cwd=EXAMPLE,
            env={
                "PORT": str(app_port),
                "SIDECAR_INTERNAL_URL": front.internal_url,
                "COOKIE_SECRET": secrets.token_hex(32),
            },
            port=app_port,
            log_path=tmp_path / "go-host-app.log",
        ) as app_url,
    ):
        yield front, app_url


async def test_go_app_connects_a_wallet_and_streams_answers_paid_from_it(
    go_site: tuple[Front, str], browser: BrowserContext, shots: Shots
) -> None:
    front, _ = go_site
    page = await browser.new_page()
    await flows.sign_in(page, front.url, "Ken Thompson", shots)

    await page.fill("#chat-input", "hello before connecting")
    await page.click("#chat-send")
    await flows.expect(page.locator("#error")).to_contain_text("Connect your Quota wallet")
    await shots.take(page, "chat-before-connecting")

    await flows.start_connect(page, front.quota_url, shots)
    before = await flows.approve(page, front.url, EMAIL, shots)
    answer = await flows.chat(page, "Summarise my notes from the Go app", shots)
    assert answer.text.startswith("Echo from Quota: Summarise my notes from the Go app")
    flows.assert_streamed(answer)
    await flows.balance_drops(page, before, shots)
    assert front.quota.balance(EMAIL) < 5_000_000
    await flows.disconnect(page, shots)


async def test_go_identity_endpoint_names_only_a_validly_signed_in_user(
    go_site: tuple[Front, str],
) -> None:
    _, app_url = go_site
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(app_url + "/quota/whoami") as resp:
            assert resp.status == 401
            assert "X-Quota-User" not in resp.headers
        async with http.get(
            app_url + "/quota/whoami", cookies={"go_user": "bWFsbG9yeQ.forged"}
        ) as resp:
            assert resp.status == 401
        async with http.post(
            app_url + "/login", data={"name": "Ken Thompson"}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
            assert resp.cookies["go_user"]["httponly"]
        async with http.get(app_url + "/quota/whoami") as resp:
            assert resp.status == 200
            assert resp.headers["X-Quota-User"] == "Ken%20Thompson"
