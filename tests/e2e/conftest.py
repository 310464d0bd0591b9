"""Browser end-to-end tests: Playwright driving Debian's Chromium, headless, on loopback only.

Nothing is downloaded: the browser is the system one (``/usr/bin/chromium``, or the path in
``QUOTA_SIDECAR_CHROMIUM``), driven by the ``playwright`` package from the test extra. When the
browser, the package or another tool a test needs is missing, the test is skipped with the
reason, unless ``QUOTA_SIDECAR_E2E=required`` (CI) turns that into a failure. ``scripts/e2e-deps``
installs what is missing.

Every test gets a fresh browser profile and a ``shots`` helper that saves one screenshot per step
under ``test-artifacts/e2e/<test name>/NN-step.png``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext, Page

REQUIRED_ENV = "QUOTA_SIDECAR_E2E"
CHROMIUM_ENV = "QUOTA_SIDECAR_CHROMIUM"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
# Headless in a container, no sandbox (root), and no calls home: without the background
# networking flags Chromium keeps dialling out, which this network refuses.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# Every Playwright wait (clicks, navigations, expectations) ends within this.
STEP_TIMEOUT_MS = 10_000
LAUNCH_TIMEOUT_MS = 30_000
VIEWPORT = {"width": 1100, "height": 820}


def e2e_required() -> bool:
    return os.environ.get(REQUIRED_ENV, "").strip().lower() == "required"


def need(ok: bool, reason: str) -> None:
    """Skip the test when ``ok`` is false, or fail it when e2e tests are required."""
    if ok:
        return
    if e2e_required():
        pytest.fail(f"{reason} ({REQUIRED_ENV}=required)", pytrace=False)
    pytest.skip(reason)


def chromium_path() -> str:
    return os.environ.get(CHROMIUM_ENV) or DEFAULT_CHROMIUM


def _artifact_name(node_name: str) -> str:
    """``test_x[http-localhost]`` → ``test_x-http-localhost``: one safe folder name per test."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", node_name).strip("-")


class Shots:
    """Numbered screenshots of the steps a test walks through."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._count = 0

    async def take(self, page: Page, step: str) -> Path:
        self._count += 1
        path = self.folder / f"{self._count:02d}-{step}.png"
        await page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Shots:
    folder = request.config.rootpath / "test-artifacts" / "e2e" / _artifact_name(request.node.name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return Shots(folder)


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    """A headless Chromium with a fresh profile; its pages share cookies like a person's tabs."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        need(False, "the playwright package is not installed (pip install -e '.[test]')")
        raise  # unreachable: need() skipped or failed
    executable = chromium_path()
    need(
        Path(executable).is_file() and os.access(executable, os.X_OK),
        f"no Chromium at {executable} (apt-get install chromium, or scripts/e2e-deps)",
    )
    options: dict[str, Any] = {
        "executable_path": executable,
        "headless": True,
        "args": list(CHROMIUM_ARGS),
        "timeout": LAUNCH_TIMEOUT_MS,
        "viewport": VIEWPORT,
        # The https test's proxy has a certificate made for the test.
        "ignore_https_errors": True,
        "color_scheme": "light",
        "locale": "en-US",
    }
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            tmp_path / "chromium-profile", **options
        )
        context.set_default_timeout(STEP_TIMEOUT_MS)
        context.set_default_navigation_timeout(STEP_TIMEOUT_MS)
        try:
            yield context
        finally:
            await context.close()
