"""Added latency and throughput of billed calls: one at a time, at fixed concurrency, per core.

Sequential: one kept-alive connection per target, requests taken in blocks that rotate over the
targets, so a noisy moment on the machine lands on all of them rather than on one. Added latency
is a target's percentile less the direct call's percentile. Measured twice: back to back (the
usual benchmark, comparable with other proxies' published figures), and with a pause before
each call, as calls arrive from a real app. The second is slower for every Python server here:
between calls the process sleeps, and it wakes with cold CPU caches and a descheduled vCPU.

Concurrent: a closed loop (each connection sends again as soon as it is answered) for a fixed
time. At saturation such a loop's latency is ``concurrency / throughput``, so the added latency
there mostly restates throughput; both are reported.

One core: the target's processes are pinned to the first CPU and everything else (the stub, the
load generator) to the second, so the target has one core to itself. All cores: nothing pinned,
and every process (load generator included) shares the machine's CPUs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import load
from bench.http1 import Client, build_request
from bench.procs import cpu_seconds, cpus, pinned
from bench.rig import ALL_SIDECARS, CHAT_BODY, CHAT_PATH, TARGET_NAMES, Rig, chat_headers
from bench.stats import added, ratio, summary_ms

BLOCK = 50  # requests per target before moving to the next one


def _present(rig: Rig) -> list[str]:
    return [name for name in TARGET_NAMES if name in rig.targets]


def sequential(
    rig: Rig, *, requests: int, warmup: int, pause_s: float = 0.0, block: int = BLOCK
) -> dict[str, Any]:
    names = _present(rig)
    clients = {name: Client(rig.targets[name].port) for name in names}
    wires = {
        name: build_request(
            "POST",
            CHAT_PATH,
            port=rig.targets[name].port,
            headers=chat_headers(),
            body=CHAT_BODY,
        )
        for name in names
    }
    samples: dict[str, list[float]] = {name: [] for name in names}
    failures = dict.fromkeys(names, 0)
    cpu = dict.fromkeys(names, 0.0)
    gc.disable()  # the client's own collections would land on whichever target was running
    try:
        for name in names:
            for _ in range(warmup):
                clients[name].exchange(wires[name])
        while any(len(samples[name]) < requests for name in names):
            for name in names:
                used = cpu_seconds(rig.targets[name].pids)
                for _ in range(min(block, requests - len(samples[name]))):
                    if pause_s:
                        time.sleep(pause_s)
                    answer = clients[name].exchange(wires[name])
                    if answer.status != 200:
                        failures[name] += 1
                    samples[name].append(answer.total_s)
                cpu[name] += cpu_seconds(rig.targets[name].pids) - used
    finally:
        gc.enable()
        for client in clients.values():
            client.close()
    by_target = {name: summary_ms(samples[name]) for name in names}
    for name in names:
        # CPU the target's own processes spent per call (clock ticks: coarse on short runs).
        by_target[name]["cpu_us_per_call"] = round(cpu[name] / len(samples[name]) * 1e6, 1)
    return {
        "requests_per_target": requests,
        "pause_before_each_call_ms": pause_s * 1000,
        "by_target": _all_targets(by_target),
        "added": _added_all(by_target, ("p50_ms", "p90_ms", "p99_ms")),
        "failures": failures,
    }


def _all_targets(found: dict[str, Any]) -> dict[str, Any]:
    return {name: found.get(name) for name in TARGET_NAMES}


def _added_all(by_target: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {
        name: added(by_target.get(name), by_target.get("direct"), keys)
        for name in TARGET_NAMES
        if name != "direct"
    }


class LoadRunner:
    """Runs one closed-loop load against a target with wrk, or the asyncio fallback."""

    def __init__(self, rig: Rig, *, use_wrk: bool, workdir: Path) -> None:
        self.rig = rig
        self.wrk = load.wrk_binary() if use_wrk else None
        self.tool = "wrk" if self.wrk else "asyncio"
        self.script = workdir / "post.lua"
        self.script.write_text(load.wrk_script(chat_headers(), CHAT_BODY), encoding="utf-8")
        self.taskset = shutil.which("taskset")

    def run(
        self, name: str, concurrency: int, duration_s: float, *, generator_cpu: int | None = None
    ) -> load.LoadResult:
        pids = self.rig.targets[name].pids
        used = cpu_seconds(pids)
        result = self._load(name, concurrency, duration_s, generator_cpu)
        cpu_s = cpu_seconds(pids) - used
        per_call = round(cpu_s / result.requests * 1e6, 1) if result.requests else None
        return dataclasses.replace(result, cpu_us_per_call=per_call)

    def _load(
        self, name: str, concurrency: int, duration_s: float, generator_cpu: int | None
    ) -> load.LoadResult:
        port = self.rig.targets[name].port
        if self.wrk is not None:
            prefix: list[str] = []
            if generator_cpu is not None and self.taskset is not None:
                prefix = [self.taskset, "-c", str(generator_cpu)]
            threads = 1 if generator_cpu is not None else len(cpus())
            return load.run_wrk(
                self.wrk,
                self.script,
                port,
                CHAT_PATH,
                concurrency=concurrency,
                duration_s=duration_s,
                threads=threads,
                cpu_prefix=prefix,
            )
        return asyncio.run(
            load.run_asyncio(
                port,
                CHAT_PATH,
                headers=chat_headers(),
                body=CHAT_BODY,
                concurrency=concurrency,
                duration_s=duration_s,
            )
        )


def concurrent(runner: LoadRunner, *, levels: Sequence[int], duration_s: float) -> dict[str, Any]:
    """Latency and throughput at each concurrency, all CPUs shared."""
    names = _present(runner.rig)
    out: dict[str, Any] = {}
    for level in levels:
        results = {name: runner.run(name, level, duration_s).to_json() for name in names}
        out[f"c{level}"] = {
            "concurrency": level,
            "tool": runner.tool,
            "by_target": _all_targets(results),
            "added": _added_all(results, ("p50_ms", "p99_ms")),
        }
    return out


def one_core(runner: LoadRunner, *, concurrency: int, duration_s: float) -> dict[str, Any]:
    """Throughput with the target alone on one CPU, the stub and the generator on another."""
    available = cpus()
    if len(available) < 2:
        return {"skipped": "one CPU only: nothing to pin the load generator and stub apart from"}
    target_cpu, other_cpu = available[0], available[1]
    rig = runner.rig
    results: dict[str, Any] = {}
    for name in _present(rig):
        measured = rig.targets[name].pids
        layout = {pid: [target_cpu] for pid in measured}
        for pid in (*rig.support_pids, os.getpid()):
            if pid not in measured:
                layout[pid] = [other_cpu]
        with pinned(layout):
            results[name] = runner.run(
                name, concurrency, duration_s, generator_cpu=other_cpu
            ).to_json()
    return {
        "concurrency": concurrency,
        "tool": runner.tool,
        "target_cpu": target_cpu,
        "generator_cpu": other_cpu,
        "generator_pinned": runner.tool == "asyncio" or runner.taskset is not None,
        "by_target": _all_targets(results),
    }


def throughput_summary(
    all_cores: dict[str, Any], single: dict[str, Any], tool: str, *, floor: str | None = None
) -> dict[str, Any]:
    """Billed calls per second, each proxy's share of nginx's on the same cores, and CPU per call
    beside the aiohttp floor on the sidecars' event loop (``floor``, a target name)."""

    def rps(block: dict[str, Any], name: str) -> float | None:
        found = block.get("by_target", {}).get(name)
        return None if found is None else float(found["rps"])

    def cpu(block: dict[str, Any], name: str) -> float | None:
        found = block.get("by_target", {}).get(name)
        return None if found is None else found.get("cpu_us_per_call")

    every = {name: rps(all_cores, name) for name in TARGET_NAMES}
    one = {name: rps(single, name) for name in TARGET_NAMES}
    cpu_one = {name: cpu(single, name) for name in TARGET_NAMES}
    cpu_every = {name: cpu(all_cores, name) for name in TARGET_NAMES}
    floor_cpu = cpu_one.get(floor) if floor is not None else None
    return {
        "tool": tool,
        "all_cores_rps": every,
        "one_core_rps": one,
        "vs_nginx_all_cores": {n: ratio(every[n], every["nginx"]) for n in TARGET_NAMES},
        "vs_nginx_one_core": {n: ratio(one[n], one["nginx"]) for n in TARGET_NAMES},
        "cpu_us_per_call_one_core": cpu_one,
        "cpu_us_per_call_all_cores": cpu_every,
        # The sidecar's CPU per call as a multiple of the bare aiohttp stack's: 1.0 would mean
        # that everything it spends is the stack's price, nothing its own.
        "floor": floor,
        "cpu_vs_floor_one_core": {n: ratio(cpu_one[n], floor_cpu) for n in ALL_SIDECARS},
        "note": "the load generator and the stub run on the same two cores as the proxy",
    }
