"""Across replicas: exactly one refresh per expiry, and no user lost to a fault on our side.

Three ``quota-sidecar run`` processes share one real Redis and one Quota emulator (real clock).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from sidecar.mock_quota import MockQuota, create_app
from sidecar.services import USER_KEY_LABEL, make_sealer
from sidecar.tokens.crypto import UserKeys, derive_key
from sidecar.tokens.factory import create_store
from sidecar.tokens.model import TokenRecord
from sidecar.tokens.store import TokenStore
from tests.integration.replicas import Replica
from tests.scrape import scrape
from tests.support import Browser, approve_consent, create_stub_upstream, make_config

ACCESS_TTL_S = 6.0  # the storm must end before the new token is due (TTL - skew)
SKEW_S = 1.0  # the wait skew, unset, follows it: every caller in the window waits
LOCK_TTL_S = 1.0
USER = "alice"
# Refresh ahead: the window opens 4 s before expiry, callers wait only in the last second.
AHEAD_SKEW_S = 4.0
AHEAD_ENV = {
    "QUOTA_SIDECAR__TOKENS__REFRESH_SKEW_S": str(AHEAD_SKEW_S),
    "QUOTA_SIDECAR__TOKENS__REFRESH_WAIT_SKEW_S": "1",
}


@dataclass
class Cluster:
    quota: MockQuota
    replicas: list[Replica]
    store: TokenStore
    user_key: str
    http: aiohttp.ClientSession
    redis_client: Any  # a Redis or a RedisCluster client
    lock_key: str

    async def record(self) -> TokenRecord | None:
        return await self.store.get(self.user_key)

    async def chat(self, replica: Replica) -> tuple[int, Any]:
        async with self.http.post(
            f"{replica.internal_url}/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-Quota-User": USER},
        ) as resp:
            return resp.status, await resp.json()

    async def storm(self, count: int) -> list[tuple[int, Any]]:
        return await asyncio.gather(
            *(self.chat(self.replicas[i % len(self.replicas)]) for i in range(count))
        )

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)

    async def lock_holder_pid(self) -> int | None:
        value = await self.redis_client.get(self.lock_key)
        if value is None:
            return None
        return int(value.decode().split(":")[1])


@pytest.fixture
def topology() -> str:
    return "standalone"


@pytest.fixture
def replica_env() -> dict[str, str]:
    """Settings every replica gets on top of the cluster's (parametrize to change them)."""
    return {}


@pytest.fixture
async def cluster(
    aiohttp_server: Callable[..., Any],
    topology: str,
    redis_url: str,
    redis_prefix: str,
    redis_client: aioredis.Redis,
    redis_cluster_url: str,
    redis_cluster_prefix: str,
    redis_cluster_client: Any,
    replica_env: dict[str, str],
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    """Three replicas on one Redis: a standalone server, or a three-node Redis Cluster."""
    if topology == "cluster":
        redis_url, redis_prefix, redis_client = (
            redis_cluster_url,
            redis_cluster_prefix,
            redis_cluster_client,
        )
    quota = MockQuota()  # real clock: the replicas are other processes
    quota.settings.access_token_ttl_s = ACCESS_TTL_S
    quota.settings.default_balance = 10**13
    quota.settings.chunk_delay_s = 0
    quota_server = await aiohttp_server(create_app(quota))
    upstream_server = await aiohttp_server(create_stub_upstream().app)
    secret = secrets.token_urlsafe(32)
    base_env = {
        "QUOTA_BASE_URL": str(quota_server.make_url("")).rstrip("/"),
        "SESSION_SECRET": secret,
        "REDIS_URL": redis_url,
        "QUOTA_SIDECAR__TOKENS__KEY_PREFIX": redis_prefix,
        "QUOTA_SIDECAR__TOKENS__REFRESH_SKEW_S": str(SKEW_S),
        "QUOTA_SIDECAR__TOKENS__LOCK_TTL_S": str(LOCK_TTL_S),
        "QUOTA_SIDECAR__UPSTREAM__URL": str(upstream_server.make_url("")).rstrip("/"),
        "QUOTA_SIDECAR__LOG__LEVEL": "warning",
        **replica_env,
    }
    replicas = [Replica.configure(base_env, tmp_path, i) for i in range(3)]
    client = quota.register_client(
        name="Replicated", redirect_uris=[f"{r.public_url}/auth/quota/callback" for r in replicas]
    )
    for replica in replicas:
        replica.env.update(
            {"QUOTA_CLIENT_ID": client.client_id, "QUOTA_CLIENT_SECRET": client.client_secret}
        )
        replica.start()
    config = make_config(session={"secret": secret})
    store = create_store(redis_url, make_sealer(config), prefix=redis_prefix)
    user_key = UserKeys(derive_key(secret.encode(), USER_KEY_LABEL)).key_for(USER)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    browser = Browser()
    try:
        await asyncio.gather(*(r.wait_ready() for r in replicas))
        browser.sign_in(replicas[0].public_url, USER)
        consent = await browser.get(f"{replicas[0].public_url}/auth/quota/connect")
        landed = await approve_consent(browser, consent, "alice@example.com")
        assert landed.status == 200, await landed.text()
        yield Cluster(
            quota=quota,
            replicas=replicas,
            store=store,
            user_key=user_key,
            http=http,
            redis_client=redis_client,
            lock_key=f"{redis_prefix}:{{{user_key}}}:lock",
        )
    finally:
        for replica in replicas:
            replica.stop()
        await browser.close()
        await http.close()
        await store.close()


async def sleep_until_refresh_is_due(cluster: Cluster, skew_s: float = SKEW_S) -> TokenRecord:
    record = await cluster.record()
    assert record is not None
    due = record.expires_at - skew_s + 0.05
    await asyncio.sleep(max(0.0, due - time.time()))
    return record


@pytest.mark.parametrize("topology", ["standalone", "cluster"])
async def test_a_storm_across_three_replicas_makes_exactly_one_refresh_per_expiry(
    cluster: Cluster,
) -> None:
    for expiry in range(5):
        before = await sleep_until_refresh_is_due(cluster)
        refreshes = cluster.quota.counters["token.refresh_token"]
        results = await cluster.storm(300)
        failed = [r for r in results if r[0] != 200]
        assert failed == [], f"expiry {expiry}: {failed[:3]}"
        assert cluster.quota.counters["token.refresh_token"] == refreshes + 1, f"expiry {expiry}"
        assert cluster.quota.counters["token.refresh_reuse"] == 0
        after = await cluster.record()
        assert after is not None
        assert after.refresh_token != before.refresh_token


async def test_a_slow_quota_past_the_lease_still_gets_exactly_one_refresh(cluster: Cluster) -> None:
    await sleep_until_refresh_is_due(cluster)
    cluster.quota.settings.token_delay_s = LOCK_TTL_S * 2.5  # the lease must be renewed
    results = await cluster.storm(30)
    assert [r[0] for r in results] == [200] * 30
    assert cluster.quota.counters["token.refresh_token"] == 1
    assert cluster.quota.counters["token.refresh_reuse"] == 0


async def test_a_holder_killed_before_quota_rotated_is_taken_over_and_the_user_stays(
    cluster: Cluster,
) -> None:
    await sleep_until_refresh_is_due(cluster)
    cluster.quota.settings.token_delay_s = 30  # the holder's call waits at Quota, unanswered
    first = asyncio.create_task(cluster.chat(cluster.replicas[0]))
    await cluster.wait_for(
        lambda: cluster.quota.counters["token.refresh_token"] == 1, 10, "the holder's token call"
    )
    holder = await cluster.lock_holder_pid()
    assert holder == cluster.replicas[0].pid
    cluster.replicas[0].kill()  # Quota's handler is cancelled with the connection: no rotation
    cluster.quota.settings.token_delay_s = 0
    with pytest.raises(aiohttp.ClientError):
        await first
    started = time.monotonic()
    status, body = await cluster.chat(cluster.replicas[1])
    assert status == 200, body
    assert time.monotonic() - started < LOCK_TTL_S + 5  # took over after the lease
    assert cluster.quota.counters["token.refresh_ok"] == 1
    assert cluster.quota.counters["token.refresh_reuse"] == 0
    assert await cluster.record() is not None


async def test_a_holder_killed_after_quota_rotated_ends_as_wallet_not_connected(
    cluster: Cluster,
) -> None:
    await sleep_until_refresh_is_due(cluster)
    cluster.quota.settings.token_response_delay_s = 30  # rotated at Quota, answer held back
    first = asyncio.create_task(cluster.chat(cluster.replicas[0]))
    await cluster.wait_for(
        lambda: cluster.quota.counters["token.refresh_ok"] == 1, 10, "Quota's rotation"
    )
    cluster.replicas[0].kill()  # the only copy of the new pair dies with it
    cluster.quota.settings.token_response_delay_s = 0
    with pytest.raises(aiohttp.ClientError):
        await first
    status, body = await cluster.chat(cluster.replicas[1])
    assert status == 401
    assert body["error"]["code"] == "wallet_not_connected"
    assert await cluster.record() is None
    # One takeover attempt, no retry loop; the next request is answered without Quota.
    calls = cluster.quota.counters["token.refresh_token"]
    assert calls == 2
    status, body = await cluster.chat(cluster.replicas[2])
    assert (status, body["error"]["code"]) == (401, "wallet_not_connected")
    assert cluster.quota.counters["token.refresh_token"] == calls


@pytest.mark.parametrize("replica_env", [AHEAD_ENV])
async def test_two_replicas_in_the_window_refresh_ahead_exactly_once_between_them(
    cluster: Cluster,
) -> None:
    before = await sleep_until_refresh_is_due(cluster, AHEAD_SKEW_S)
    cluster.quota.settings.token_delay_s = 1.0  # the holder's refresh runs while both are called
    pair = cluster.replicas[:2]
    results = await asyncio.gather(*(cluster.chat(pair[i % 2]) for i in range(40)))
    assert [r[0] for r in results] == [200] * 40
    await cluster.wait_for(
        lambda: cluster.quota.counters["token.refresh_ok"] == 1, 10, "the refresh ahead"
    )

    async def outcomes() -> list[dict[str, float]]:
        scrapes = [await scrape(r.admin_url) for r in pair]
        return [
            {
                o: m.value("quota_sidecar_refreshes_total", outcome=o)
                for o in ("ok", "already_fresh")
            }
            for m in scrapes
        ]

    # Each replica started a refresh of its own; the one that waited for the lease found the
    # record refreshed and made no token call.
    deadline = time.monotonic() + 10
    while True:
        seen = await outcomes()
        oks = sorted(o["ok"] for o in seen)
        if oks == [0, 1] and all(o["ok"] + o["already_fresh"] >= 1 for o in seen):
            break
        assert time.monotonic() < deadline, seen
        await asyncio.sleep(0.05)
    assert cluster.quota.counters["token.refresh_token"] == 1
    assert cluster.quota.counters["token.refresh_reuse"] == 0
    after = await cluster.record()
    assert after is not None
    assert after.refresh_token != before.refresh_token


@pytest.mark.parametrize("replica_env", [AHEAD_ENV])
async def test_sigterm_waits_for_a_refresh_ahead_so_the_rotated_pair_is_written(
    cluster: Cluster,
) -> None:
    before = await sleep_until_refresh_is_due(cluster, AHEAD_SKEW_S)
    cluster.quota.settings.token_response_delay_s = 1.0  # rotated at Quota, answer held back
    status, body = await cluster.chat(cluster.replicas[0])
    assert status == 200, body
    await cluster.wait_for(
        lambda: cluster.quota.counters["token.refresh_ok"] == 1, 10, "Quota's rotation"
    )
    assert await cluster.replicas[0].terminate() == 0  # while the answer is still on its way
    after = await cluster.record()
    assert after is not None
    assert after.refresh_token != before.refresh_token  # the new pair landed before the exit
    assert "were cut" not in cluster.replicas[0].log(), cluster.replicas[0].log()
    cluster.quota.settings.token_response_delay_s = 0
    status, body = await cluster.chat(cluster.replicas[1])
    assert status == 200, body
    assert cluster.quota.counters["token.refresh_reuse"] == 0
