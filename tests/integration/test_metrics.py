"""``/metrics`` on the admin listener moves with real traffic: connects, refreshes, streams, errors.

The stack is the real thing on loopback (emulator, stub app, the sidecar's three listeners);
each test scrapes and parses the exposition as Prometheus would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import aiohttp
import pytest
from multidict import CIMultiDict

from sidecar.log import JsonFormatter
from sidecar.metrics import CONNECT_ERRORS
from sidecar.wire_times import TimedResponseHandler
from tests.integration.conftest import Stack
from tests.scrape import scrape, wait_for_value
from tests.support import sse_events


async def test_metrics_follow_a_connect_a_refresh_and_a_stream(stack: Stack) -> None:
    landed = await stack.connect("alice")
    assert landed.status == 200
    connected = await scrape(stack.admin_url)
    assert connected.value("quota_sidecar_connects_started_total") == 1
    assert connected.value("quota_sidecar_connects_completed_total") == 1
    assert connected.value("quota_sidecar_wallets_connected_total") == 1
    assert connected.value("quota_sidecar_refreshes_total", outcome="ok") == 0

    record = await stack.store.get(stack.user_key("alice"))
    assert record is not None
    stack.clock.now = record.expires_at - 1
    assert (await stack.chat("alice")).status == 200
    refreshed = await scrape(stack.admin_url)
    assert refreshed.value("quota_sidecar_refreshes_total", outcome="ok") == 1
    # The code exchange, the userinfo read (who the user is at Quota) and the refresh.
    assert refreshed.value("quota_sidecar_quota_request_duration_seconds_count", call="oauth") == 3
    assert refreshed.value("quota_sidecar_quota_request_duration_seconds_count", call="v1") == 1

    stack.quota.settings.chunk_delay_s = 0.05
    resp = await stack.chat("alice", stream=True)
    events = sse_events(resp)
    assert (await anext(events)).startswith("data: ")
    await wait_for_value(
        stack.admin_url, "quota_sidecar_open_streams", 1, listener="internal", route="v1"
    )
    rest = [event async for event in events]
    assert rest[-1] == "data: [DONE]"
    final = await wait_for_value(
        stack.admin_url, "quota_sidecar_open_streams", 0, listener="internal", route="v1"
    )

    v1_ok = {"listener": "internal", "route": "v1", "status": "200"}
    assert final.value("quota_sidecar_requests_total", **v1_ok) == 2
    assert final.value("quota_sidecar_requests_total", listener="public", route="auth") == 2
    for family in ("request_duration_seconds", "added_latency_seconds"):
        count = f"quota_sidecar_{family}_count"
        assert final.value(count, listener="internal", route="v1") == 2
    assert final.value("quota_sidecar_app_request_duration_seconds_count", call="probe") == 2
    # Bounded labels only: no user, no token, no key.
    current = await stack.store.get(stack.user_key("alice"))
    assert current is not None
    for secret in ("alice", stack.user_key("alice"), current.access_token, current.refresh_token):
        assert secret not in final.text


async def test_quota_error_codes_on_v1_are_counted_by_code(stack: Stack) -> None:
    await stack.connect("alice")
    stack.quota.set_balance("alice@example.com", 0)
    resp = await stack.chat("alice")
    assert resp.status == 402
    assert (await resp.json())["error"]["code"] == "insufficient_credits"  # passed through as is
    scraped = await scrape(stack.admin_url)
    assert (
        scraped.value("quota_sidecar_quota_errors_total", call="v1", code="insufficient_credits")
        == 1
    )
    assert scraped.value("quota_sidecar_requests_total", route="v1", status="402") == 1


async def test_an_ended_grant_and_a_disconnect_are_counted(stack: Stack) -> None:
    await stack.connect("alice")
    record = await stack.store.get(stack.user_key("alice"))
    assert record is not None
    await stack.services.quota.revoke(record.refresh_token)  # the user revoked the app at Quota
    stack.clock.now = record.expires_at - 1
    assert (await stack.chat("alice")).status == 401

    await stack.connect("bob")
    resp = await stack.backend.post(
        f"{stack.internal_url}/auth/quota/disconnect", headers={"X-Quota-User": "bob"}
    )
    assert resp.status == 200
    scraped = await scrape(stack.admin_url)
    assert scraped.value("quota_sidecar_refreshes_total", outcome="invalid_grant") == 1
    assert scraped.value("quota_sidecar_wallets_disconnected_total", reason="grant_ended") == 1
    assert scraped.value("quota_sidecar_wallets_disconnected_total", reason="user") == 1


async def test_failed_connects_are_counted_by_quota_error_with_a_bounded_label(
    stack: Stack,
) -> None:
    stack.browser.sign_in(stack.public_url, "alice")
    callback = f"{stack.public_url}/auth/quota/callback"
    resp = await stack.browser.get(f"{callback}?error=access_denied&state=x", allow_redirects=False)
    assert resp.status == 302
    for i in range(40):  # a browser can put anything in ?error=
        await stack.browser.get(f"{callback}?error=made_up_{i}&state=x", allow_redirects=False)
    scraped = await scrape(stack.admin_url)
    name = "quota_sidecar_connects_failed_total"
    assert scraped.value(name, quota_error="access_denied") == 1
    assert scraped.value(name) == 41
    labels = scraped.label_values(name, "quota_error")
    assert "other" in labels
    assert len(labels - CONNECT_ERRORS) <= 17  # up to 16 new codes, then "other"


async def test_websocket_connections_are_a_gauge(stack: Stack) -> None:
    name = "quota_sidecar_websocket_connections"
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{stack.public_url}/ws", protocols=("chat.v1",))
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "echo:hello"
        await wait_for_value(stack.admin_url, name, 1, listener="public", route="proxy")
        await ws.close()
    await wait_for_value(stack.admin_url, name, 0, listener="public", route="proxy")


async def test_the_request_id_reaches_quota_the_app_and_the_token_endpoint(stack: Stack) -> None:
    landed = await stack.connect("alice")
    (callback,) = [r for r in landed.history if r.url.path == "/auth/quota/callback"]
    (exchange,) = [r for r in stack.quota.requests if r.path == "/oauth/token"]
    assert CIMultiDict(exchange.headers)["X-Request-Id"] == callback.headers["X-Request-Id"]

    resp = await stack.backend.post(
        f"{stack.internal_url}/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-Quota-User": "alice", "X-Request-Id": "app-req-42"},
    )
    assert resp.headers["X-Request-Id"] == "app-req-42"
    forwarded = [r for r in stack.quota.requests if r.path == "/v1/chat/completions"][-1]
    assert CIMultiDict(forwarded.headers)["X-Request-Id"] == "app-req-42"

    resp = await stack.browser.get(f"{stack.public_url}/page")
    assert resp.status == 200
    proxied = CIMultiDict(stack.upstream.requests[-1].headers)
    assert proxied["X-Request-Id"] == [resp.headers["X-Request-Id"]]


@pytest.fixture
def access_lines() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.INFO)
    logger = logging.getLogger("sidecar.access")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


async def test_the_access_log_line_names_route_user_bytes_and_durations(
    stack: Stack, access_lines: list[logging.LogRecord]
) -> None:
    await stack.connect("alice")
    resp = await stack.chat("alice")
    assert resp.status == 200
    body = await resp.read()
    line = next(r for r in access_lines if getattr(r, "route", None) == "v1")
    fields = line.__dict__
    assert fields["listener"] == "internal"
    assert fields["method"] == "POST"
    assert fields["status"] == 200
    assert fields["bytes"] >= len(body)  # on the wire: headers and body
    assert fields["user"] == stack.user_key("alice")[:16]
    assert fields["upstream_ms"] > 0
    assert 0 <= fields["added_ms"] <= fields["duration_ms"]
    auth = [r for r in access_lines if getattr(r, "route", None) == "auth"]
    assert {r.__dict__["listener"] for r in auth} == {"public"}
    assert all(r.__dict__["user"] == stack.user_key("alice")[:16] for r in auth)


@pytest.mark.parametrize("config_overrides", [{"identity": {"internal_api_key": "k" * 40}}])
async def test_a_refused_api_key_is_rendered_with_the_request_id_and_counted_as_401(
    stack: Stack,
) -> None:
    resp = await stack.backend.get(
        f"{stack.internal_url}/v1/models",
        headers={"X-Quota-User": "alice", "Authorization": "Bearer wrong", "X-Request-Id": "r-1"},
    )
    assert resp.status == 401
    assert resp.headers["X-Request-Id"] == "r-1"
    error = (await resp.json())["error"]
    assert (error["code"], error["request_id"]) == ("invalid_api_key", "r-1")
    await wait_for_value(
        stack.admin_url,
        "quota_sidecar_requests_total",
        1,
        listener="internal",
        route="v1",
        status="401",
    )


async def test_a_client_that_leaves_mid_stream_is_counted_as_499(stack: Stack) -> None:
    await stack.connect("alice")
    stack.quota.settings.chunk_delay_s = 0.2
    resp = await stack.chat("alice", stream=True)
    assert (await anext(sse_events(resp))).startswith("data: ")
    resp.close()  # the client leaves; the sidecar's handler is cancelled
    final = await wait_for_value(
        stack.admin_url,
        "quota_sidecar_requests_total",
        1,
        listener="internal",
        route="v1",
        status="499",
    )
    assert final.value("quota_sidecar_open_streams", listener="internal", route="v1") == 0


async def test_time_the_sidecar_spends_after_quotas_answer_was_read_counts_as_added(
    stack: Stack, access_lines: list[logging.LogRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop busy elsewhere between reading Quota's answer and resuming the call (here: held
    for BUSY_S right after the read) is the sidecar's own time, not Quota's."""
    await stack.connect("alice")
    busy_s = 0.5
    data_received = TimedResponseHandler.data_received

    def then_busy(self: TimedResponseHandler, data: bytes) -> None:
        data_received(self, data)
        time.sleep(busy_s)  # other requests' work in the same turn of the loop

    monkeypatch.setattr(TimedResponseHandler, "data_received", then_busy)
    resp = await stack.chat("alice")
    assert resp.status == 200
    await resp.read()
    line = next(r for r in access_lines if getattr(r, "route", None) == "v1").__dict__
    assert line["added_ms"] >= busy_s * 1000
    assert line["upstream_ms"] < busy_s * 1000


async def test_an_api_key_in_a_v1_query_is_masked_in_the_access_line(
    stack: Stack, access_lines: list[logging.LogRecord]
) -> None:
    """Gemini's REST API takes its key as ``?key=``: a client that sends one must not see it
    written to the log, whatever Quota answers."""
    await stack.connect("alice")
    secret = "AIzaSyNotARealKey0123456789"
    resp = await stack.backend.post(
        f"{stack.internal_url}/v1beta/models/gemini-2.0-flash:generateContent?key={secret}&alt=sse",
        json={"contents": [{"parts": [{"text": "hi"}]}]},
        headers={"X-Quota-User": "alice"},
    )
    await resp.read()
    line = next(r for r in access_lines if "/v1beta/" in str(r.__dict__.get("path")))
    assert secret not in line.__dict__["path"]
    assert "key=***" in line.__dict__["path"]
    assert secret not in JsonFormatter().format(line)  # the line as written to stdout
