"""Closed-loop load at a fixed concurrency: wrk when installed, else an asyncio generator.

Both report the same thing for one target: completed billed calls per second, the latency
percentiles of those calls, and how many failed. wrk (C, one event loop per thread) costs the
shared CPUs far less than Python does; the asyncio fallback is there so the bench runs anywhere,
and says that it was used. Either way the generator runs on the same two cores as the proxy.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.http1 import AsyncClient, build_request
from bench.stats import percentile

WRK_GRACE_S = 15.0  # beyond the run's own duration, for start-up and the summary


@dataclass(frozen=True)
class LoadResult:
    tool: str
    concurrency: int
    duration_s: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    # CPU the target's own processes spent per completed call (set by the caller, who knows them).
    cpu_us_per_call: float | None = None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def wrk_version(path: str) -> str:
    done = subprocess.run(  # noqa: S603 - a fixed argument list, no shell
        [path, "-v"], capture_output=True, text=True, timeout=10, check=False
    )
    return (
        (done.stdout or done.stderr).strip().splitlines()[0]
        if (done.stdout or done.stderr)
        else "?"
    )


def _lua_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def wrk_script(headers: Mapping[str, str], body: bytes) -> str:
    """A wrk script that POSTs ``body`` with ``headers`` and prints a JSON summary at the end."""
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body.decode())}"]
    lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
    lines.append(
        """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\\n',
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""
    )
    return "\n".join(lines)


def run_wrk(
    binary: str,
    script: Path,
    port: int,
    path: str,
    *,
    concurrency: int,
    duration_s: float,
    threads: int,
    cpu_prefix: Sequence[str] = (),
) -> LoadResult:
    """Run wrk once against ``127.0.0.1:port``; ``cpu_prefix`` (e.g. ``taskset -c 1``) pins it."""
    argv = [
        *cpu_prefix,
        binary,
        f"-t{max(1, min(threads, concurrency))}",
        f"-c{concurrency}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}{path}",
    ]
    done = subprocess.run(  # noqa: S603 - argv is built here, no shell
        argv, capture_output=True, text=True, timeout=duration_s + WRK_GRACE_S, check=False
    )
    summary = next(
        (json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")), None
    )
    if done.returncode != 0 or summary is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    seconds = summary["duration_us"] / 1e6
    return LoadResult(
        tool="wrk",
        concurrency=concurrency,
        duration_s=round(seconds, 3),
        requests=summary["requests"],
        errors=summary["errors"],
        rps=round(summary["requests"] / seconds, 1),
        p50_ms=summary["p50_us"] / 1000,
        p90_ms=summary["p90_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        max_ms=summary["max_us"] / 1000,
    )


async def run_asyncio(
    port: int,
    path: str,
    *,
    headers: Mapping[str, str],
    body: bytes,
    concurrency: int,
    duration_s: float,
) -> LoadResult:
    """The fallback: ``concurrency`` kept-alive connections, each sending as soon as answered."""
    request = build_request("POST", path, port=port, headers=headers, body=body)
    clients = [await AsyncClient.open(port) for _ in range(concurrency)]
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration_s

    async def worker(client: AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            answer = await client.exchange(request)
            if answer.status != 200:
                errors += 1
            latencies.append(answer.total_s)

    started = time.perf_counter()
    try:
        await asyncio.wait_for(
            asyncio.gather(*(worker(c) for c in clients)), duration_s + WRK_GRACE_S
        )
    finally:
        for client in clients:
            client.close()
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return LoadResult(
        tool="asyncio",
        concurrency=concurrency,
        duration_s=round(elapsed, 3),
        requests=len(ordered),
        errors=errors,
        rps=round(len(ordered) / elapsed, 1),
        p50_ms=percentile(ordered, 50) * 1000,
        p90_ms=percentile(ordered, 90) * 1000,
        p99_ms=percentile(ordered, 99) * 1000,
        max_ms=ordered[-1] * 1000 if ordered else 0.0,
    )
