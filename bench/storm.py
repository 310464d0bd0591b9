"""Refresh storms: many concurrent calls for one user whose token needs refreshing, two ways.

Each round, on ``size`` kept-alive connections at once::

    baseline burst   every call for the steady user (fresh token): what a burst costs anyway
    storm burst      every call for a storm user, one of:

      in the window       (``by_target.<t>``) the token has just entered the refresh window
                          (29.7 s left): one call starts the refresh in the background (the stub
                          answers it after REFRESH_DELAY_MS) and every call goes on at once with
                          the current token; nobody waits for Quota
      inside the wait skew (``by_target.<t>.inside_wait_skew``) the token has under
                          ``refresh_wait_skew_s`` left (connected anew just before, its token
                          4 s from expiry): one call refreshes, the others wait for it (single
                          flight), then all go on with the new token

What a storm costs beyond the baseline burst, and beyond the refresh round-trip when callers must
wait for it (measured on its own, from the bench to the stub's token endpoint)::

    in the window:        extra = storm percentile - baseline percentile
    inside the wait skew: extra = storm percentile - baseline percentile - refresh round-trip

The stub counts refresh calls: exactly one per round is the single-flight promise (counted once
the refresh started in the background has had time to end).
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
    REFRESH_DELAY_MS,
    REFRESH_SKEW_S,
    REFRESH_WAIT_SKEW_S,
    SIDECARS,
    STEADY_TTL_S,
    STEADY_USER,
    STORM_USER,
    WAIT_STORM_USER,
    Rig,
    chat_headers,
)
from bench.sidecar_proc import connect_user
from bench.stats import percentile, summary_ms

OPEN_BATCH = 100  # connections opened at once: within aiohttp's default listen backlog (128)
STALE_MARGIN_S = 0.3  # past the fresh window, so the token is surely inside the skew
BURST_TIMEOUT_S = 30.0
RTT_SAMPLES = 5
# A refresh started in the background may still be at the stub when the burst ends: it has this
# long to end (and a second one, if any, to show) before the round's refreshes are counted.
SETTLE_S = 0.1 + 4 * REFRESH_DELAY_MS / 1000
# The wait-skew storm's token, when it is connected: already inside the wait skew.
WAIT_TTL_S = REFRESH_WAIT_SKEW_S - 1.0


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


class _Rounds:
    """One variant's samples over its rounds."""

    def __init__(self) -> None:
        self.baseline: list[float] = []
        self.stormed: list[float] = []
        self.refreshes: list[int] = []
        self.errors = 0

    def summary(
        self, size: int, rounds: int, rtt_s: float, *, callers_wait: bool
    ) -> dict[str, Any]:
        base, hit = summary_ms(self.baseline), summary_ms(self.stormed)
        rtt_ms = rtt_s * 1000
        waited_ms = rtt_ms if callers_wait else 0.0
        return {
            "concurrent_calls": size,
            "rounds": rounds,
            "callers_wait_for_the_refresh": callers_wait,
            "refresh_calls_per_round": self.refreshes,
            "refresh_round_trip_ms": round(rtt_ms, 3),
            "baseline_burst": base,
            "storm_burst": hit,
            "extra_p50_ms": round(hit["p50_ms"] - base["p50_ms"] - waited_ms, 3),
            "extra_p99_ms": round(hit["p99_ms"] - base["p99_ms"] - waited_ms, 3),
            "errors": self.errors,
        }


async def _variant(rig: Rig, name: str, size: int, rounds: int, rtt_s: float) -> dict[str, Any]:
    target = rig.targets[name]
    sidecar, port = target.sidecar, target.port
    assert sidecar is not None, f"{name} is not a sidecar"
    steady, in_window, inside_skew = (
        build_request("POST", CHAT_PATH, port=port, headers=chat_headers(user), body=CHAT_BODY)
        for user in (STEADY_USER, STORM_USER, WAIT_STORM_USER)
    )
    clients = await open_many(port, size)
    window, waiting = _Rounds(), _Rounds()
    try:
        await _burst(clients, steady)  # warm every connection
        # A grant of its own: the one from the rig's start may be past the window by now.
        await connect_user(sidecar, STORM_USER, ttl_s=REFRESH_SKEW_S + FRESH_WINDOW_S)
        last_refresh = time.monotonic()
        for _ in range(rounds):
            wait_s = last_refresh + FRESH_WINDOW_S + STALE_MARGIN_S - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            await _round(rig, clients, steady, in_window, window)
            last_refresh = time.monotonic()
            await asyncio.sleep(SETTLE_S)
            window.refreshes.append(rig.stub_counts().get("refresh", 0))

            await connect_user(
                sidecar, WAIT_STORM_USER, ttl_s=WAIT_TTL_S, refresh_ttl_s=STEADY_TTL_S
            )
            await _round(rig, clients, steady, inside_skew, waiting)
            await asyncio.sleep(SETTLE_S)
            waiting.refreshes.append(rig.stub_counts().get("refresh", 0))
    finally:
        for client in clients:
            client.close()
    return {
        **window.summary(size, rounds, rtt_s, callers_wait=False),
        "inside_wait_skew": waiting.summary(size, rounds, rtt_s, callers_wait=True),
    }


async def _round(
    rig: Rig, clients: list[AsyncClient], steady: bytes, storm: bytes, into: _Rounds
) -> None:
    samples, failed = await _burst(clients, steady)
    into.baseline += samples
    into.errors += failed
    rig.reset_stub_counts()
    samples, failed = await _burst(clients, storm)
    into.stormed += samples
    into.errors += failed


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
        "variants_note": (
            "by_target.<t>: the token has just entered the refresh window (refreshed in the "
            "background); by_target.<t>.inside_wait_skew: it has under refresh_wait_skew_s left "
            "(every caller waits for the refresh)"
        ),
        "by_target": by_target,
    }
