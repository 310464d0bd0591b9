"""Refresh storm: many concurrent calls for one user whose token has just entered the refresh window.

Each round, on ``size`` kept-alive connections at once::

    baseline burst   every call for the steady user (fresh token): what a burst costs anyway
    storm burst      every call for the storm user, whose token is now inside the refresh skew:
                     one call refreshes (the stub answers the refresh after REFRESH_DELAY_MS),
                     the others wait for it (single flight), then all go on

The waiters' extra latency is what the storm burst costs beyond the baseline burst and one
refresh round-trip (measured on its own, from the bench to the stub's token endpoint)::

    extra = storm percentile - baseline percentile - refresh round-trip

The stub counts refresh calls: exactly one per round is the single-flight promise.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.http1 import AsyncClient, Client, build_request
from bench.rig import (
    CHAT_BODY,
    CHAT_PATH,
    FRESH_WINDOW_S,
    REFRESH_SKEW_S,
    SIDECARS,
    STEADY_USER,
    STORM_USER,
    Rig,
    chat_headers,
)
from bench.stats import percentile, summary_ms

OPEN_BATCH = 100  # connections opened at once: within aiohttp's default listen backlog (128)
STALE_MARGIN_S = 0.3  # past the fresh window, so the token is surely inside the skew
BURST_TIMEOUT_S = 30.0
RTT_SAMPLES = 5


def refresh_round_trip_s(rig: Rig) -> float:
    """Median time of a refresh call made straight to the stub (the wait a storm must pay)."""
    form = f"grant_type=refresh_token&refresh_token=quota_refresh_{REFRESH_SKEW_S + FRESH_WINDOW_S}_rtt"
    wire = build_request(
        "POST",
        "/oauth/token",
        port=rig.quota_port,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        body=form.encode(),
    )
    client = Client(rig.quota_port)
    try:
        samples = sorted(client.exchange(wire).total_s for _ in range(RTT_SAMPLES))
    finally:
        client.close()
    return percentile(samples, 50)


async def open_many(port: int, count: int) -> list[AsyncClient]:
    clients: list[AsyncClient] = []
    while len(clients) < count:
        batch = min(OPEN_BATCH, count - len(clients))
        clients += await asyncio.gather(*(AsyncClient.open(port) for _ in range(batch)))
    return clients


async def _burst(clients: list[AsyncClient], wire: bytes) -> tuple[list[float], int]:
    answers = await asyncio.wait_for(
        asyncio.gather(*(client.exchange(wire) for client in clients)), BURST_TIMEOUT_S
    )
    return [a.total_s for a in answers], sum(1 for a in answers if a.status != 200)


async def _variant(rig: Rig, name: str, size: int, rounds: int, rtt_s: float) -> dict[str, Any]:
    port = rig.targets[name].port
    steady = build_request(
        "POST", CHAT_PATH, port=port, headers=chat_headers(STEADY_USER), body=CHAT_BODY
    )
    storm = build_request(
        "POST", CHAT_PATH, port=port, headers=chat_headers(STORM_USER), body=CHAT_BODY
    )
    clients = await open_many(port, size)
    baseline: list[float] = []
    stormed: list[float] = []
    refreshes: list[int] = []
    errors = 0
    try:
        await _burst(clients, steady)  # warm every connection
        last_refresh = rig.connected_at[name]  # the storm user's grant came with its connect
        for _ in range(rounds):
            wait_s = last_refresh + FRESH_WINDOW_S + STALE_MARGIN_S - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            samples, failed = await _burst(clients, steady)
            baseline += samples
            errors += failed
            rig.reset_stub_counts()
            samples, failed = await _burst(clients, storm)
            last_refresh = time.monotonic()
            stormed += samples
            errors += failed
            refreshes.append(rig.stub_counts().get("refresh", 0))
    finally:
        for client in clients:
            client.close()
    base, hit = summary_ms(baseline), summary_ms(stormed)
    rtt_ms = rtt_s * 1000
    return {
        "concurrent_calls": size,
        "rounds": rounds,
        "refresh_calls_per_round": refreshes,
        "refresh_round_trip_ms": round(rtt_ms, 3),
        "baseline_burst": base,
        "storm_burst": hit,
        "extra_p50_ms": round(hit["p50_ms"] - base["p50_ms"] - rtt_ms, 3),
        "extra_p99_ms": round(hit["p99_ms"] - base["p99_ms"] - rtt_ms, 3),
        "errors": errors,
    }


def measure(rig: Rig, *, size: int, rounds: int) -> dict[str, Any]:
    rtt_s = refresh_round_trip_s(rig)
    by_target: dict[str, Any] = {}
    for name in SIDECARS:
        if name in rig.targets:
            by_target[name] = asyncio.run(_variant(rig, name, size, rounds, rtt_s))
        else:
            by_target[name] = None
    return {
        "refresh_delay_note": "the stub answers each refresh after a fixed delay (rig.REFRESH_DELAY_MS)",
        "by_target": by_target,
    }
