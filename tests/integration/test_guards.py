"""Per-user guards: open calls and spend, per user, on one sidecar and across two sharing Redis.

Streams are held open by the emulator's pacing (``chunk_delay_s``): a paced answer lasts many
seconds, so every call of a burst is in flight together; the test ends them by hanging up,
which is also how it checks that a client leaving gives its slot back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from sidecar.app import Sidecar
from sidecar.config import GuardsConfig, ListenConfig
from sidecar.config_loader import ConfigError, build_config
from sidecar.errors import SpendLimitReached, TooManyStreams
from sidecar.guards import Limits, MemoryUserGuards, UserGuards
from sidecar.guards.base import seconds_left, window_start
from sidecar.guards.redis_guards import RedisUserGuards
from sidecar.metrics import Metrics
from sidecar.mock_quota.catalog import find_model, reply_for, reply_words
from sidecar.services import make_sealer, open_services
from sidecar.tokens.factory import create_store
from sidecar.tokens.redis_store import RedisTokenStore
from tests.integration.conftest import Stack
from tests.scrape import scrape
from tests.support import FakeClock, TcpProxy, make_config, through

PACED_S = 1.0  # between two words of a paced answer: ~15 s per stream, cut short by the test
WAIT_S = 5.0


def guards(**values: Any) -> dict[str, dict[str, Any]]:
    return {"guards": values}


async def _open_streams(stack: Stack, internal_url: str, user: str, count: int) -> list[Any]:
    """``count`` streamed chats for ``user`` at once; the answers' headers, bodies unread."""
    calls = [
        stack.backend.post(
            f"{internal_url}/v1/chat/completions",
            json={
                "model": "gpt-4o-mini",
                "stream": True,
                "messages": [{"role": "user", "content": "a long answer please"}],
            },
            headers={"X-Quota-User": user},
        )
        for _ in range(count)
    ]
    return list(await asyncio.gather(*calls))


async def _eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        assert time.monotonic() < deadline, f"{what} did not happen within {WAIT_S} s"
        await asyncio.sleep(0.05)


async def _chat_succeeds(stack: Stack, user: str) -> bool:
    resp = await stack.chat(user)
    await resp.read()
    return resp.status == 200


async def _refused(resp: aiohttp.ClientResponse) -> tuple[int, str, str | None]:
    body = await resp.json()
    return resp.status, body["error"]["code"], resp.headers.get("Retry-After")


# --- the streams guard --------------------------------------------------------------------------


@pytest.mark.parametrize("store_kind", ["memory", "redis"])
@pytest.mark.parametrize("config_overrides", [guards(max_concurrent_streams_per_user=2)])
async def test_six_concurrent_streams_for_one_user_let_exactly_two_through(stack: Stack) -> None:
    await stack.connect("alice")
    await stack.connect("bob")
    stack.quota.settings.chunk_delay_s = PACED_S

    answers = await _open_streams(stack, stack.internal_url, "alice", 6)
    bobs = await _open_streams(stack, stack.internal_url, "bob", 2)

    streaming = [r for r in answers if r.status == 200]
    refused = [await _refused(r) for r in answers if r.status != 200]
    assert len(streaming) == 2
    assert refused == [(429, "too_many_streams", "1")] * 4
    assert [r.status for r in bobs] == [200, 200]  # another user is not affected
    assert stack.quota.counters["chat.streamed"] == 4  # the refused never reached Quota
    scraped = await scrape(stack.admin_url)
    assert scraped.value("quota_sidecar_guard_rejections_total", code="too_many_streams") == 4

    for resp in streaming:  # the client hangs up mid-stream: the slots come back
        resp.close()
    await _eventually(lambda: _chat_succeeds(stack, "alice"), "a call after the hang-ups")
    for resp in bobs:
        resp.close()


@pytest.mark.parametrize("config_overrides", [guards(max_concurrent_streams_per_user=1)])
async def test_a_v1_websocket_holds_a_slot_while_it_lasts(stack: Stack) -> None:
    await stack.connect("alice")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            f"{stack.internal_url}/v1/realtime", headers={"X-Quota-User": "alice"}
        )
        refused = await stack.chat("alice")
        assert await _refused(refused) == (429, "too_many_streams", "1")
        await ws.close()
    await _eventually(lambda: _chat_succeeds(stack, "alice"), "a call after the WebSocket closed")


@pytest.mark.parametrize("config_overrides", [guards(max_concurrent_streams_per_user=2)])
async def test_the_streams_limit_holds_across_two_sidecars_sharing_redis(
    stack: Stack, redis_url: str, redis_prefix: str, redis_client: aioredis.Redis
) -> None:
    await stack.connect("alice")
    stack.quota.settings.chunk_delay_s = PACED_S
    async with _second_sidecar(stack, redis_url, redis_prefix) as other_url:
        first, second = await asyncio.gather(
            _open_streams(stack, stack.internal_url, "alice", 3),
            _open_streams(stack, other_url, "alice", 3),
        )
        answers = first + second
        assert sorted(r.status for r in answers) == [200, 200, 429, 429, 429, 429]
        key = f"{redis_prefix}:{{{stack.user_key('alice')}}}:streams"
        assert await redis_client.zcard(key) == 2
        for resp in answers:
            resp.close()

        async def slots_freed() -> bool:
            return int(await redis_client.zcard(key)) == 0

        await _eventually(slots_freed, "both sidecars releasing their leases")


@asynccontextmanager
async def _second_sidecar(stack: Stack, redis_url: str, prefix: str) -> AsyncIterator[str]:
    """Another sidecar on the same Redis (same secrets, own listeners): a second replica."""
    config = dataclasses.replace(
        stack.config,
        listen=ListenConfig(public="127.0.0.1:0", internal="127.0.0.1:0", admin="off"),
    )
    store = create_store(redis_url, make_sealer(config), prefix=prefix)
    async with open_services(config, clock=stack.clock, store=store) as services:
        sidecar = Sidecar(services)
        await sidecar.start()
        try:
            yield sidecar.urls["internal"]
        finally:
            await sidecar.stop()


# --- the spend guard ----------------------------------------------------------------------------

PERIOD_S = 86400
# What the stack's default chat ("hello there" to gpt-4o-mini) costs at the emulator's prices.
_MODEL = find_model("gpt-4o-mini")
assert _MODEL is not None
CHAT_COST = _MODEL.cost(2, len(reply_words(reply_for("hello there"), 512)[0]))


@pytest.mark.parametrize("store_kind", ["memory", "redis"])
@pytest.mark.parametrize(
    "config_overrides", [guards(spend_limit_credits=3 * CHAT_COST, spend_period_s=PERIOD_S)]
)
async def test_the_spend_limit_refuses_billed_calls_until_the_window_ends(stack: Stack) -> None:
    await stack.connect("alice")
    await stack.connect("bob")
    first = await (await stack.chat("alice")).json()
    assert first["quota"]["credits_used"] == CHAT_COST
    streamed = await stack.chat("alice", stream=True)  # streamed calls count too
    assert streamed.status == 200
    await streamed.read()
    assert (await stack.chat("alice")).status == 200
    balance = stack.quota.balance("alice@example.com")

    refused = await stack.chat("alice")
    status, code, retry_after = await _refused(refused)
    assert (status, code) == (429, "spend_limit_reached")
    assert retry_after is not None
    assert int(retry_after) == seconds_left(stack.clock(), PERIOD_S) <= PERIOD_S
    assert stack.quota.balance("alice@example.com") == balance  # nothing reached Quota
    assert (await stack.chat("bob")).status == 200  # another user is not affected
    models = await stack.backend.get(
        f"{stack.internal_url}/v1/models", headers={"X-Quota-User": "alice"}
    )
    assert models.status == 200  # reads are not billed: the wallet page keeps working

    stack.clock.advance(int(retry_after))  # the next window
    assert (await stack.chat("alice")).status == 200


@pytest.mark.parametrize(
    "config_overrides", [guards(spend_limit_credits=1, spend_period_s=PERIOD_S)]
)
async def test_the_spend_is_kept_in_redis_per_user_and_window_with_an_expiry(
    stack: Stack, redis_prefix: str, redis_client: aioredis.Redis
) -> None:
    await stack.connect("alice")
    body = await (await stack.chat("alice")).json()
    window = window_start(stack.clock(), PERIOD_S)
    key = f"{redis_prefix}:{{{stack.user_key('alice')}}}:spend:{window}"
    assert int(await redis_client.get(key)) == body["quota"]["credits_used"]
    assert 0 < await redis_client.ttl(key) <= seconds_left(stack.clock(), PERIOD_S) + 60
    assert await _refused(await stack.chat("alice")) == (
        429,
        "spend_limit_reached",
        str(seconds_left(stack.clock(), PERIOD_S)),
    )


# --- the guards themselves, on every store -------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def make_guards(
    request: pytest.FixtureRequest, redis_url: str, redis_prefix: str
) -> AsyncIterator[Callable[..., UserGuards]]:
    """``make_guards(limits, clock=…, url=…)``: guards of the parametrized kind, closed after."""
    made: list[tuple[UserGuards, aioredis.Redis | None]] = []

    def make(limits: Limits, *, clock: FakeClock, url: str = redis_url) -> UserGuards:
        guards: UserGuards
        client = None
        if request.param == "memory":
            guards = MemoryUserGuards(limits, clock=clock, metrics=Metrics(process=False))
        else:
            client = aioredis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
            guards = RedisUserGuards(
                client, limits, prefix=redis_prefix, clock=clock, metrics=Metrics(process=False)
            )
        made.append((guards, client))
        return guards

    yield make
    for guards, client in made:
        await guards.close()
        if client is not None:
            await client.aclose()


def _limits(**changes: Any) -> Limits:
    return dataclasses.replace(Limits.of(GuardsConfig()), **changes)


async def test_admissions_racing_for_two_slots_get_exactly_two(
    make_guards: Callable[..., UserGuards],
) -> None:
    guards = make_guards(_limits(max_streams=2), clock=FakeClock())
    results = await asyncio.gather(
        *(guards.admit("alice", f"call-{i}", billed=True) for i in range(6)),
        return_exceptions=True,
    )
    assert results.count(True) == 2
    assert [type(r) for r in results if r is not True] == [TooManyStreams] * 4
    await guards.settle("alice", "call-0", slot=True, credits_used=0)
    assert await guards.admit("alice", "call-6", billed=False) is True


async def test_spend_counts_only_in_its_own_window(make_guards: Callable[..., UserGuards]) -> None:
    clock = FakeClock()
    guards = make_guards(_limits(spend_limit=100, spend_period_s=60), clock=clock)
    await guards.admit("alice", "a", billed=True)
    await guards.settle("alice", "a", slot=False, credits_used=100)
    with pytest.raises(SpendLimitReached, match="100 credits"):
        await guards.admit("alice", "b", billed=True)
    assert await guards.admit("alice", "c", billed=False) is False  # not billed: not checked
    assert await guards.admit("bob", "d", billed=True) is False
    clock.advance(seconds_left(clock(), 60))
    assert await guards.admit("alice", "e", billed=True) is False  # a new window


async def test_a_dead_replicas_leases_lapse_and_live_ones_are_renewed(
    redis_url: str, redis_prefix: str
) -> None:
    clock = FakeClock()
    limits = _limits(max_streams=1, lease_ttl_s=30)
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    dead, live = (
        RedisUserGuards(c, limits, prefix=redis_prefix, clock=clock, metrics=Metrics(process=False))
        for c in clients
    )
    try:
        assert await dead.admit("alice", "crashed", billed=True) is True
        await dead.close()  # no settle: the process died with the call open
        assert await live.admit("bob", "bobs", billed=True) is True
        clock.advance(20)
        with pytest.raises(TooManyStreams):
            await live.admit("alice", "too-soon", billed=True)
        await live.renew()  # bob's lease is pushed back; the dead replica renews nothing
        clock.advance(11)
        assert await live.admit("alice", "after-lapse", billed=True) is True
        with pytest.raises(TooManyStreams):
            await live.admit("bob", "second", billed=True)
    finally:
        await live.close()
        for client in clients:
            await client.aclose()


async def test_an_unreachable_redis_lets_calls_through_and_counts_it(
    redis_proxy: TcpProxy, redis_url: str, redis_prefix: str
) -> None:
    metrics = Metrics(process=False)
    client = aioredis.Redis.from_url(
        through(redis_proxy, redis_url), socket_timeout=1, socket_connect_timeout=1
    )
    guards = RedisUserGuards(
        client,
        _limits(max_streams=1, spend_limit=1),
        prefix=redis_prefix,
        clock=FakeClock(),
        metrics=metrics,
    )
    try:
        await redis_proxy.stop()
        assert await guards.admit("alice", "a", billed=True) is False  # through, no slot held
        assert await guards.admit("alice", "b", billed=True) is False
        await guards.settle("alice", "a", slot=False, credits_used=50)  # does not raise
        errors = "quota_sidecar_guard_errors_total"
        assert metrics.registry.get_sample_value(errors, {"operation": "admit"}) == 2
        assert metrics.registry.get_sample_value(errors, {"operation": "settle"}) == 1
        await redis_proxy.start()
        assert await guards.admit("alice", "c", billed=True) is True  # guarded again
    finally:
        await guards.close()
        await client.aclose()


async def test_the_redis_guards_work_on_every_topology(any_topology_url: str) -> None:
    """Both keys of a user share a Cluster slot, so the two-key scripts run everywhere."""
    store = create_store(any_topology_url, make_sealer(make_config()))
    assert isinstance(store, RedisTokenStore)
    clock = FakeClock()
    limits = _limits(max_streams=1, spend_limit=10, spend_period_s=60)
    prefix = f"test-{secrets.token_hex(6)}"
    guards = RedisUserGuards(
        store.client, limits, prefix=prefix, clock=clock, metrics=Metrics(process=False)
    )
    try:
        users = [f"user-{i}" for i in range(8)]  # spread over the cluster's slots
        for user in users:
            assert await guards.admit(user, "a", billed=True) is True
            with pytest.raises(TooManyStreams):
                await guards.admit(user, "b", billed=True)
            await guards.settle(user, "a", slot=True, credits_used=10)
            with pytest.raises(SpendLimitReached):
                await guards.admit(user, "c", billed=True)
        await guards.renew()
        assert await guards.admit(users[0], "d", billed=False) is True
        await guards.settle(users[0], "d", slot=True, credits_used=0)
    finally:
        await guards.close()
        for user in users:
            window = window_start(clock(), 60)
            await store.client.delete(guards.streams_key(user))
            await store.client.delete(guards.spend_key(user, window))
        await store.close()


async def test_with_every_guard_off_no_guard_runs(stack: Stack) -> None:
    assert stack.services.guards is None  # the forwarder skips admission and settlement


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"max_concurrent_streams_per_user": -1}, "guards.max_concurrent_streams_per_user: must"),
        ({"spend_limit_credits": -5}, "guards.spend_limit_credits: must be 0 (no limit)"),
        ({"spend_period_s": 0}, "guards.spend_period_s: must be greater than 0"),
        ({"stream_lease_ttl_s": 0.5}, "guards.stream_lease_ttl_s: must be at least 1"),
        ({"spend_limit_credits": "lots"}, "guards.spend_limit_credits: must be a whole number"),
    ],
)
def test_guard_settings_out_of_range_are_refused_naming_the_key(
    values: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        make_config(guards=values)
    assert any(p.startswith(problem) for p in refused.value.problems), refused.value.problems


def test_guard_settings_come_from_the_environment_too() -> None:
    config = build_config(
        {"quota": {"client_id": "c", "client_secret": "s"}, "session": {"secret": "s" * 40}},
        {
            "QUOTA_SIDECAR__GUARDS__MAX_CONCURRENT_STREAMS_PER_USER": "3",
            "QUOTA_SIDECAR__GUARDS__SPEND_LIMIT_CREDITS": "500000",
        },
    )
    assert Limits.of(config.guards) == Limits(3, 500000, 86400, 30.0)
