"""Refresh ahead: inside the refresh window callers go on with the still valid token while one
refresh runs in the background; only inside the wait skew (or past expiry) do they wait for it."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

import pytest

from sidecar.tokens.manager import AHEAD_RETRY_S, CLOSE_WAIT_S
from sidecar.tokens.model import TokenRecord
from tests.integration.conftest import Stack
from tests.scrape import scrape, wait_for_value

WAIT_S = 10.0  # how long a test waits for a background refresh to land
# The emulator holds each refresh this long: every call of a test is answered well before.
SLOW_REFRESH_S = 2.0


async def record_of(stack: Stack, user: str = "alice") -> TokenRecord:
    record = await stack.store.get(stack.user_key(user))
    assert record is not None
    return record


async def enter_window(stack: Stack, user: str = "alice") -> TokenRecord:
    """Move time into the refresh window, above the wait skew: 29 s left by default."""
    record = await record_of(stack, user)
    stack.clock.now = record.expires_at - stack.config.tokens.refresh_skew_s + 1
    assert record.expires_at - stack.clock() > stack.config.tokens.refresh_wait_skew_s
    return record


async def wait_for_record(
    stack: Stack, done: Callable[[TokenRecord | None], bool], what: str, user: str = "alice"
) -> TokenRecord | None:
    deadline = time.monotonic() + WAIT_S
    while not done(record := await stack.store.get(stack.user_key(user))):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)
    return record


async def wait_for_new_pair(stack: Stack, old: TokenRecord) -> TokenRecord:
    new = await wait_for_record(
        stack, lambda r: r is not None and r.refresh_token != old.refresh_token, "the new pair"
    )
    assert new is not None
    return new


def last_bearer(stack: Stack) -> str:
    """The bearer of the last /v1 call Quota received."""
    seen = [r for r in stack.quota.requests if r.path == "/v1/chat/completions"][-1]
    return seen.headers["Authorization"].removeprefix("Bearer ")


@pytest.mark.parametrize("store_kind", ["redis", "memory"])
async def test_a_call_in_the_window_goes_on_with_the_current_token_while_one_refresh_runs(
    stack: Stack,
) -> None:
    await stack.connect("alice")
    assert (await stack.chat("alice")).status == 200  # the Redis store may keep a copy now
    old = await enter_window(stack)
    stack.quota.settings.token_delay_s = SLOW_REFRESH_S
    for _ in range(2):  # the second call finds the refresh running: no second one
        resp = await stack.chat("alice")
        assert resp.status == 200
        assert last_bearer(stack) == old.access_token
    assert stack.quota.counters["token.refresh_token"] == 1
    assert stack.quota.counters["token.refresh_ok"] == 0  # answered before the refresh ended

    new = await wait_for_new_pair(stack, old)
    assert new.last_refresh_outcome == "ok"
    for _ in range(3):  # from the store or the record cache: never the old token again
        assert (await stack.chat("alice")).status == 200
        assert last_bearer(stack) == new.access_token
    assert stack.quota.counters["token.refresh_token"] == 1


@pytest.mark.parametrize(
    "left_s", [4.0, 0.0, -1.0], ids=["inside-wait-skew", "at-expiry", "expired"]
)
async def test_a_call_inside_the_wait_skew_or_past_expiry_waits_for_the_new_token(
    stack: Stack, left_s: float
) -> None:
    await stack.connect("alice")
    old = await record_of(stack)
    stack.clock.now = old.expires_at - left_s
    resp = await stack.chat("alice")
    assert resp.status == 200
    new = await record_of(stack)
    assert new.refresh_token != old.refresh_token
    assert last_bearer(stack) == new.access_token
    assert stack.quota.counters["token.refresh_token"] == 1


@pytest.mark.parametrize(
    "config_overrides", [{"tokens": {"refresh_skew_s": 30, "refresh_wait_skew_s": 30}}]
)
async def test_a_wait_skew_equal_to_the_refresh_skew_makes_every_call_in_the_window_wait(
    stack: Stack,
) -> None:
    await stack.connect("alice")
    old = await record_of(stack)
    stack.clock.now = old.expires_at - 29  # early in the window, as before refresh ahead
    assert (await stack.chat("alice")).status == 200
    new = await record_of(stack)
    assert new.refresh_token != old.refresh_token
    assert last_bearer(stack) == new.access_token


async def test_three_hundred_calls_entering_the_window_make_one_refresh_and_none_waits_for_it(
    stack: Stack,
) -> None:
    await stack.connect("alice")
    old = await enter_window(stack)
    # Held well past the storm's length (about 1.5 s here; more on a busy machine).
    stack.quota.settings.token_delay_s = 6.0
    responses = await asyncio.gather(*(stack.chat("alice") for _ in range(300)))
    assert [r.status for r in responses] == [200] * 300
    # Every call was answered while the one refresh was still at Quota: none waited for it.
    assert stack.quota.counters["token.refresh_token"] == 1
    assert stack.quota.counters["token.refresh_ok"] == 0
    assert {
        r.headers["Authorization"] for r in stack.quota.requests if r.path == "/v1/chat/completions"
    } == {f"Bearer {old.access_token}"}
    await wait_for_new_pair(stack, old)
    assert stack.quota.counters["token.refresh_token"] == 1
    assert stack.quota.counters["token.refresh_reuse"] == 0


@pytest.mark.parametrize(
    ("config_overrides", "failure"),
    [({}, "5xx"), ({"quota": {"timeout_s": 0.3}}, "timeout")],
    ids=["5xx", "timeout"],
)
async def test_a_transient_failure_ahead_fails_no_call_keeps_the_record_and_is_not_retried_at_once(
    stack: Stack, failure: str
) -> None:
    await stack.connect("alice")
    old = await enter_window(stack)
    if failure == "5xx":
        stack.quota.settings.token_fail_status = 503
        stack.quota.settings.token_fail_count = -1
    else:
        stack.quota.settings.token_delay_s = 2  # past quota.timeout_s
    assert (await stack.chat("alice")).status == 200
    noted = await wait_for_record(
        stack, lambda r: r is not None and r.last_refresh_outcome == "transient", "the note"
    )
    assert noted is not None
    assert (noted.access_token, noted.refresh_token) == (old.access_token, old.refresh_token)
    assert noted.last_refresh_at == stack.clock()
    metrics = await scrape(stack.admin_url)
    assert metrics.value("quota_sidecar_refreshes_total", outcome="transient") == 1

    # Quota is failing: calls right after the failure use the token and send no refresh.
    stack.clock.advance(AHEAD_RETRY_S - 0.5)
    for _ in range(5):
        assert (await stack.chat("alice")).status == 200
        assert last_bearer(stack) == old.access_token
    assert stack.quota.counters["token.refresh_token"] == 1

    # A few seconds on, one call tries again in the background; Quota is back, so it lands.
    stack.quota.settings.token_fail_count = 0
    stack.quota.settings.token_delay_s = 0
    stack.clock.advance(0.5)
    assert (await stack.chat("alice")).status == 200
    new = await wait_for_new_pair(stack, old)
    assert new.last_refresh_outcome == "ok"
    assert stack.quota.counters["token.refresh_token"] == 2


# The memory store answers without suspending, so the failed refresh has ended by the time its
# note is readable (with Redis it would still be giving its lease back, and a caller joining it
# would share its fallback rather than start the refresh this test is about).
@pytest.mark.parametrize("store_kind", ["memory"])
async def test_a_call_inside_the_wait_skew_waits_for_a_refresh_even_right_after_a_failure(
    stack: Stack,
) -> None:
    await stack.connect("alice")
    old = await enter_window(stack)
    stack.quota.settings.token_fail_status = 503
    stack.quota.settings.token_fail_count = 1
    assert (await stack.chat("alice")).status == 200
    await wait_for_record(
        stack, lambda r: r is not None and r.last_refresh_outcome == "transient", "the note"
    )
    stack.clock.now = old.expires_at - stack.config.tokens.refresh_wait_skew_s + 1
    assert (await stack.chat("alice")).status == 200
    new = await record_of(stack)
    assert last_bearer(stack) == new.access_token != old.access_token
    assert stack.quota.counters["token.refresh_token"] == 2


async def test_invalid_grant_ahead_lets_the_call_through_then_answers_wallet_not_connected(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.tokens.manager")
    await stack.connect("alice")
    old = await enter_window(stack)
    stack.quota.settings.token_delay_s = 0.3
    stack.quota.settings.token_fail_status = 400  # invalid_grant: Quota ended the grant
    stack.quota.settings.token_fail_count = 1
    resp = await stack.chat("alice")
    assert resp.status == 200  # the access token is still good: the call goes through
    assert last_bearer(stack) == old.access_token
    await wait_for_record(stack, lambda r: r is None, "the record to be forgotten")

    resp = await stack.chat("alice")
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "wallet_not_connected"
    assert stack.quota.counters["token.refresh_token"] == 1
    metrics = await scrape(stack.admin_url)
    assert metrics.value("quota_sidecar_refreshes_total", outcome="invalid_grant") == 1
    assert metrics.value("quota_sidecar_wallets_disconnected_total", reason="grant_ended") == 1
    # No one awaited the failed refresh, yet its exception was retrieved (and logged by us).
    gc.collect()
    assert "never retrieved" not in caplog.text
    assert "a refresh ahead of expiry failed" in caplog.text


async def test_invalid_grant_ahead_keeps_a_grant_that_replaced_the_one_that_failed(
    stack: Stack,
) -> None:
    await stack.connect("alice")
    failing = await enter_window(stack)
    stack.quota.settings.token_delay_s = 0.3
    stack.quota.settings.token_fail_status = 400
    stack.quota.settings.token_fail_count = 1
    assert (await stack.chat("alice")).status == 200
    # While Quota refuses (slowly), a new connect replaces the grant.
    newer = await stack.replace_grant("alice", failing.version)
    await wait_for_value(
        stack.admin_url, "quota_sidecar_refreshes_total", 1, outcome="invalid_grant"
    )
    kept = await record_of(stack)  # the compare-and-delete missed: the newer grant stays
    assert kept.refresh_token == newer["refresh_token"]
    assert (await stack.chat("alice")).status == 200
    assert last_bearer(stack) == newer["access_token"]


async def test_shutdown_gives_a_refresh_ahead_a_bounded_time_and_keeps_the_record(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    await stack.connect("alice")
    old = await enter_window(stack)
    stack.quota.settings.token_delay_s = CLOSE_WAIT_S + 2  # Quota never answers in time
    assert (await stack.chat("alice")).status == 200
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="sidecar.tokens.manager"):
        await stack.services.tokens.close()
    assert time.monotonic() - started < CLOSE_WAIT_S + 1
    assert "1 token refresh(es) still running" in caplog.text
    kept = await record_of(stack)
    assert kept.refresh_token == old.refresh_token  # Quota never rotated: nothing was lost


async def test_shutdown_waits_for_a_refresh_ahead_whose_tokens_quota_already_rotated(
    stack: Stack,
) -> None:
    await stack.connect("alice")
    old = await enter_window(stack)
    stack.quota.settings.token_response_delay_s = CLOSE_WAIT_S / 2  # rotated, answer held back
    assert (await stack.chat("alice")).status == 200
    deadline = time.monotonic() + WAIT_S
    while stack.quota.counters["token.refresh_ok"] == 0:
        assert time.monotonic() < deadline, "Quota did not rotate"
        await asyncio.sleep(0.01)
    await stack.services.tokens.close()  # what shutdown runs before the store closes
    new = await record_of(stack)
    assert new.refresh_token != old.refresh_token  # the rotated pair was written
    assert new.last_refresh_outcome == "ok"
