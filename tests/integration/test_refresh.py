"""Refresh before expiry, once per expiry in a process, and never lose a grant to a fault."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from sidecar.app import Sidecar
from sidecar.config import ListenConfig
from sidecar.services import make_sealer, open_services
from sidecar.tokens.factory import create_store
from sidecar.tokens.model import TokenRecord
from tests.integration.conftest import Stack, free_port


async def expire_soon(stack: Stack, user: str = "alice") -> None:
    """Move time to within the wait skew of the user's access-token expiry: the next call waits
    for the refresh (above it the refresh runs ahead, see ``test_refresh_ahead``)."""
    record = await stack.store.get(stack.user_key(user))
    assert record is not None
    stack.clock.now = record.expires_at - stack.config.tokens.refresh_wait_skew_s + 1


async def assert_kept_after_a_transient_failure(
    stack: Stack, before: TokenRecord | None, user: str = "alice"
) -> None:
    """The same grant is kept; only the note of the failed refresh changed."""
    after = await stack.store.get(stack.user_key(user))
    assert before is not None
    assert after is not None
    assert (after.access_token, after.refresh_token, after.expires_at) == (
        before.access_token,
        before.refresh_token,
        before.expires_at,
    )
    assert (after.last_refresh_outcome, after.last_refresh_at) == ("transient", stack.clock())


async def test_token_near_expiry_is_refreshed_before_forwarding(stack: Stack) -> None:
    await stack.connect("alice")
    old = await stack.store.get(stack.user_key("alice"))
    await expire_soon(stack)
    resp = await stack.chat("alice")
    assert resp.status == 200
    assert stack.quota.counters["token.refresh_token"] == 1
    new = await stack.store.get(stack.user_key("alice"))
    assert old is not None
    assert new is not None
    assert new.access_token != old.access_token
    assert new.refresh_token != old.refresh_token
    seen = [r for r in stack.quota.requests if r.path == "/v1/chat/completions"][-1]
    assert seen.headers["Authorization"] == f"Bearer {new.access_token}"


async def test_twenty_concurrent_requests_cause_exactly_one_refresh(stack: Stack) -> None:
    await stack.connect("alice")
    await expire_soon(stack)
    stack.quota.settings.token_delay_s = 0.1  # keep the refresh in flight while all arrive
    responses = await asyncio.gather(*(stack.chat("alice") for _ in range(20)))
    assert [r.status for r in responses] == [200] * 20
    assert stack.quota.counters["token.refresh_token"] == 1
    assert stack.quota.counters["token.refresh_reuse"] == 0


async def test_invalid_grant_forgets_the_tokens_and_answers_wallet_not_connected(
    stack: Stack,
) -> None:
    await stack.connect("alice")
    record = await stack.store.get(stack.user_key("alice"))
    assert record is not None
    await stack.services.quota.revoke(record.refresh_token)  # the user revoked the app at Quota
    stack.clock.now = record.expires_at + 1
    resp = await stack.chat("alice")
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "wallet_not_connected"
    assert await stack.store.get(stack.user_key("alice")) is None


async def test_quota_5xx_during_refresh_keeps_the_record_and_uses_the_valid_token(
    stack: Stack,
) -> None:
    await stack.connect("alice")
    before = await stack.store.get(stack.user_key("alice"))
    await expire_soon(stack)
    stack.quota.settings.token_fail_status = 503
    stack.quota.settings.token_fail_count = -1
    resp = await stack.chat("alice")
    assert resp.status == 200
    await assert_kept_after_a_transient_failure(stack, before)


@pytest.mark.parametrize("config_overrides", [{"quota": {"timeout_s": 0.3}}])
async def test_quota_timeout_during_refresh_keeps_the_record_and_uses_the_valid_token(
    stack: Stack,
) -> None:
    await stack.connect("alice")
    before = await stack.store.get(stack.user_key("alice"))
    await expire_soon(stack)
    stack.quota.settings.token_delay_s = 2
    resp = await stack.chat("alice")
    assert resp.status == 200
    await assert_kept_after_a_transient_failure(stack, before)


async def test_quota_5xx_after_expiry_is_503_refresh_unavailable_with_retry_after(
    stack: Stack,
) -> None:
    await stack.connect("alice")
    before = await stack.store.get(stack.user_key("alice"))
    assert before is not None
    stack.clock.now = before.expires_at + 1
    stack.quota.settings.token_fail_status = 502
    stack.quota.settings.token_fail_count = -1
    resp = await stack.chat("alice")
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "refresh_unavailable"
    assert int(resp.headers["Retry-After"]) > 0
    await assert_kept_after_a_transient_failure(stack, before)
    # Quota comes back: service resumes without the user doing anything.
    stack.quota.settings.token_fail_count = 0
    assert (await stack.chat("alice")).status == 200


async def test_disconnect_during_an_in_flight_refresh_stays_disconnected(stack: Stack) -> None:
    await stack.connect("alice")
    await expire_soon(stack)
    stack.quota.settings.token_delay_s = 0.3
    chat = asyncio.create_task(stack.chat("alice"))
    await asyncio.sleep(0.1)  # the refresh is now waiting on Quota
    gone = await stack.backend.post(
        f"{stack.internal_url}/auth/quota/disconnect", headers={"X-Quota-User": "alice"}
    )
    assert gone.status == 200
    resp = await chat
    assert resp.status == 401
    assert await stack.store.get(stack.user_key("alice")) is None
    await asyncio.sleep(0.05)
    assert await stack.store.get(stack.user_key("alice")) is None


async def test_a_client_that_goes_away_does_not_cancel_the_refresh(
    stack: Stack, redis_client: aioredis.Redis
) -> None:
    await stack.connect("alice")
    old = await stack.store.get(stack.user_key("alice"))
    await expire_soon(stack)
    stack.quota.settings.token_delay_s = 0.3
    chat = asyncio.create_task(stack.chat("alice"))
    await asyncio.sleep(0.1)
    chat.cancel()  # the client hangs up while the token call is at Quota
    await asyncio.sleep(0.5)
    new = await stack.store.get(stack.user_key("alice"))
    assert old is not None
    assert new is not None
    assert new.refresh_token != old.refresh_token  # the rotated pair was kept
    assert stack.quota.counters["token.refresh_ok"] == 1
    assert (await stack.chat("alice")).status == 200
    assert stack.quota.counters["token.refresh_token"] == 1
    lock_key = f"{stack.config.tokens.key_prefix}:{{{stack.user_key('alice')}}}:lock"
    assert await redis_client.exists(lock_key) == 0  # the lease was given back


async def test_store_down_is_503_store_unavailable_and_deletes_nothing(stack: Stack) -> None:
    await stack.connect("alice")
    dead = create_store(f"redis://127.0.0.1:{free_port()}/0", make_sealer(stack.config))
    config = replace(
        stack.config,
        listen=ListenConfig(public="127.0.0.1:0", internal="127.0.0.1:0", admin="off"),
    )
    async with open_services(config, clock=stack.clock, store=dead) as services:
        sidecar = Sidecar(services)
        await sidecar.start()
        try:
            resp = await stack.backend.post(
                f"{sidecar.urls['internal']}/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                headers={"X-Quota-User": "alice"},
            )
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "store_unavailable"
            assert "Retry-After" in resp.headers
        finally:
            await sidecar.stop()
    assert await stack.store.get(stack.user_key("alice")) is not None


async def revoke_access_token(stack: Stack, user: str = "alice") -> None:
    record = await stack.store.get(stack.user_key(user))
    assert record is not None
    async with stack.backend.post(
        f"{stack.quota_url}/oauth/revoke",
        data={
            "token": record.access_token,
            "token_type_hint": "access_token",
            "client_id": stack.client.client_id,
            "client_secret": stack.client.client_secret,
        },
    ) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_a_401_from_quota_gets_one_forced_refresh_and_one_replay(
    stack: Stack, stream: bool
) -> None:
    await stack.connect("alice")
    await revoke_access_token(stack)  # unexpired, but Quota no longer takes it
    resp = await stack.chat("alice", stream=stream)
    assert resp.status == 200
    body = await resp.read()
    assert b"Echo from Quota: hello there" in body or b"Echo" in body
    assert stack.quota.counters["token.refresh_token"] == 1
    assert stack.quota.counters["chat.completions"] == 2  # the refused call and its replay


@pytest.mark.parametrize("config_overrides", [{"quota": {"replay_max_bytes": 16}}])
async def test_a_body_too_large_to_replay_passes_quotas_401_through(stack: Stack) -> None:
    await stack.connect("alice")
    await revoke_access_token(stack)
    resp = await stack.chat("alice")
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "invalid_token"
    assert stack.quota.counters["chat.completions"] == 1
    assert stack.quota.counters["token.refresh_token"] == 0


async def test_a_second_401_after_the_replay_passes_through_without_a_loop(stack: Stack) -> None:
    await stack.connect("alice")
    record = await stack.store.get(stack.user_key("alice"))
    assert record is not None
    # Quota refuses every bearer: the forced refresh works but the replay is refused again.
    stack.quota.settings.token_fail_count = 0
    await revoke_access_token(stack)
    original = stack.quota.grants.authenticate

    def refuse(token: str):  # type: ignore[no-untyped-def]
        from sidecar.mock_quota.errors import ApiError

        raise ApiError(401, "invalid_token", "refused for the test")

    stack.quota.grants.authenticate = refuse  # type: ignore[method-assign]
    try:
        resp = await stack.chat("alice")
    finally:
        stack.quota.grants.authenticate = original  # type: ignore[method-assign]
    assert resp.status == 401
    assert stack.quota.counters["chat.completions"] == 2
    assert stack.quota.counters["token.refresh_token"] == 1


class StaleOnce:
    """A store whose next ``get`` answers an old record, as a lagging read would."""

    def __init__(self, real: Any, stale: Any, reads: int) -> None:
        self._real, self._stale, self._reads = real, stale, reads

    async def get(self, user_key: str) -> Any:
        if self._reads > 0:
            self._reads -= 1
            return self._stale
        return await self._real.get(user_key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


async def test_a_late_request_holding_a_rotated_token_uses_the_new_pair_not_quota(
    stack: Stack,
) -> None:
    await stack.connect("alice")
    await expire_soon(stack)
    old = await stack.store.get(stack.user_key("alice"))
    assert (await stack.chat("alice")).status == 200  # rotates: grace record for old's token
    assert stack.quota.counters["token.refresh_token"] == 1
    new = await stack.store.get(stack.user_key("alice"))
    assert old is not None
    assert new is not None
    manager = stack.services.tokens
    manager.store = StaleOnce(stack.store, old, reads=2)  # type: ignore[assignment]
    try:
        got = await manager.fresh(stack.user_key("alice"))
    finally:
        manager.store = stack.store
    assert got.refresh_token == new.refresh_token
    assert stack.quota.counters["token.refresh_token"] == 1  # no spent token sent to Quota
    assert stack.quota.counters["token.refresh_reuse"] == 0


async def test_invalid_grant_deletes_only_the_record_that_failed(stack: Stack) -> None:
    await stack.connect("alice")
    await expire_soon(stack)
    failing = await stack.store.get(stack.user_key("alice"))
    assert failing is not None
    # Quota refuses this refresh, slowly; meanwhile "another replica" stores a newer grant.
    stack.quota.settings.token_delay_s = 0.3
    stack.quota.settings.token_fail_status = 400
    stack.quota.settings.token_fail_count = 1
    chat = asyncio.create_task(stack.chat("alice"))
    await asyncio.sleep(0.1)
    newer = await stack.replace_grant("alice", failing.version)
    resp = await chat
    assert resp.status == 200  # served with the newer grant
    kept = await stack.store.get(stack.user_key("alice"))
    assert kept is not None
    assert kept.refresh_token == newer["refresh_token"]
