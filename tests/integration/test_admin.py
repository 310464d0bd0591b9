"""The admin listener on its own: readiness checks, shutdown order, the exposition formats."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from sidecar.app import Sidecar
from sidecar.mock_quota import MockQuota, create_app
from sidecar.services import open_services
from tests.integration.conftest import free_port
from tests.scrape import parse, scrape
from tests.support import make_config

LOOPBACK = {"public": "127.0.0.1:0", "internal": "127.0.0.1:0", "admin": "127.0.0.1:0"}


@contextlib.asynccontextmanager
async def running(**sections: dict[str, Any]) -> AsyncIterator[Sidecar]:
    """A sidecar with every listener on a free loopback port and the in-memory store."""
    listen = {**LOOPBACK, **sections.pop("listen", {})}
    async with open_services(make_config(listen=listen, **sections)) as services:
        sidecar = Sidecar(services)
        await sidecar.start()
        try:
            yield sidecar
        finally:
            await sidecar.stop()


async def get(url: str, **kw: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url, **kw) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


@pytest.mark.parametrize(("backlog", "expected"), [(None, 511), (2048, 2048)])
async def test_every_listener_asks_the_kernel_for_the_configured_backlog(
    monkeypatch: pytest.MonkeyPatch, backlog: int | None, expected: int
) -> None:
    asked: list[int] = []
    create_server = asyncio.base_events.BaseEventLoop.create_server

    async def spy(self: asyncio.AbstractEventLoop, *args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs["backlog"])
        return await create_server(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "create_server", spy)
    limits = {} if backlog is None else {"limits": {"backlog": backlog}}
    async with running(**limits):
        assert asked == [expected] * 3  # public, internal, admin


async def test_readyz_asks_quota_discovery_only_when_configured_to(
    aiohttp_server: Callable[..., Any],
) -> None:
    server = await aiohttp_server(create_app(MockQuota()))
    alive = str(server.make_url("")).rstrip("/")
    dead = f"http://127.0.0.1:{free_port()}"

    async with running(quota={"base_url": alive, "check_discovery_on_ready": True}) as sidecar:
        status, body = await get(f"{sidecar.urls['admin']}/readyz")
        assert status == 200
        assert body["checks"]["quota_discovery"] == {"ok": True}
    async with running(quota={"base_url": dead, "check_discovery_on_ready": True}) as sidecar:
        status, body = await get(f"{sidecar.urls['admin']}/readyz")
        assert status == 503
        assert body["failed"] == ["quota_discovery"]
        assert body["checks"]["quota_discovery"] == {"ok": False, "error": "ClientConnectorError"}
        scraped = await scrape(sidecar.urls["admin"])
        errors = "quota_sidecar_quota_errors_total"
        assert scraped.value(errors, call="discovery", code="unreachable") == 1
    async with running(quota={"base_url": dead}) as sidecar:  # the default: not asked
        status, body = await get(f"{sidecar.urls['admin']}/readyz")
        assert status == 200
        assert body["checks"]["quota_discovery"] == {"ok": True, "skipped": True}


async def test_shutdown_fails_readiness_first_then_closes_listeners_after_the_drain() -> None:
    drain_s = 0.5
    async with running(shutdown={"drain_delay_s": drain_s, "grace_s": 5}) as sidecar:
        admin, public = sidecar.urls["admin"], sidecar.urls["public"]
        assert (await get(f"{admin}/readyz"))[0] == 200
        started = time.monotonic()
        stopping = asyncio.create_task(sidecar.shutdown())
        await asyncio.sleep(0)
        status, body = await get(f"{admin}/readyz")
        assert status == 503
        assert body["failed"] == ["shutdown"]
        assert (await get(f"{admin}/healthz"))[0] == 200  # alive all the same
        assert (await get(f"{public}/anything"))[0] == 502  # still accepting (no app behind)
        async with asyncio.timeout(10):
            await stopping
        assert time.monotonic() - started >= drain_s
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(f"{public}/anything")


async def test_the_admin_listener_can_be_turned_off() -> None:
    async with running(listen={"admin": "off"}) as sidecar:
        assert set(sidecar.urls) == {"public", "internal"}


async def test_metrics_speak_openmetrics_to_a_scraper_that_asks_for_it() -> None:
    async with (
        running() as sidecar,
        aiohttp.ClientSession() as http,
        http.get(
            f"{sidecar.urls['admin']}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await resp.text()).endswith("# EOF\n")


async def test_two_sidecars_in_one_process_keep_their_own_metrics() -> None:
    async with running() as one, running() as two:
        assert (await get(f"{one.urls['internal']}/v1/models"))[0] == 400  # identity_missing
        first, second = await scrape(one.urls["admin"]), await scrape(two.urls["admin"])
        name = "quota_sidecar_requests_total"
        assert first.value(name, listener="internal", route="v1", status="400") == 1
        assert second.value(name, listener="internal") == 0
        assert parse(first.text).value("quota_sidecar_build_info") == 1
