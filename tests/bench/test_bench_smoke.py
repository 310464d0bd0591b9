"""The benchmark suite runs end to end in smoke mode and reports a number for every scenario.

Timings are never asserted: CI machines are noisy and the smoke counts are far too small to mean
anything. What is checked is that ``bench/run.py --smoke`` starts everything, measures every
scenario against the direct call and both sidecars, stops what it started, cleans Redis, and
writes the same JSON shape as the full run. nginx and wrk may be missing: their columns are then
null, with a reason, and the smoke run never installs them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "bench" / "run.py"
SMOKE_TIMEOUT_S = 180
SIDECARS = ("sidecar", "sidecar_redis")  # one process each: every scenario
# Every sidecar target of the load scenarios (the Redis one with --workers auto as well).
LOADED_SIDECARS = (*SIDECARS, "sidecar_workers")
FLOORS = ("floor_asyncio", "floor_uvloop")
# Scenario → a path under ``by_target.<target>`` that must hold a number for each target named.
MEASURED = {
    "latency_sequential": ("p50_ms",),
    "latency_concurrent/c16": ("rps",),
    "latency_concurrent/c64": ("p99_ms",),
    "throughput_one_core": ("rps",),
    "sse": ("first_byte", "p50_ms"),
}


@dataclass(frozen=True)
class SmokeRun:
    results: dict[str, Any]
    out_dir: Path
    tmp_dir: Path
    stdout: str


def _dig(data: Any, *path: str) -> Any:
    for part in path:
        assert isinstance(data, dict), f"expected a mapping before {part!r}, got {data!r}"
        data = data.get(part)
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def run_smoke(factory: pytest.TempPathFactory, redis_url: str, *extra: str) -> SmokeRun:
    out_dir = factory.mktemp("bench-results")
    tmp_dir = factory.mktemp("bench-tmp")
    env = {**os.environ, "REDIS_URL": redis_url, "TMPDIR": str(tmp_dir)}
    done = subprocess.run(
        [sys.executable, str(RUN), "--smoke", "--out", str(out_dir), *extra],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    results = json.loads((out_dir / "smoke.json").read_text(encoding="utf-8"))
    return SmokeRun(results, out_dir, tmp_dir, done.stdout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> SmokeRun:
    return run_smoke(tmp_path_factory, redis_url)


@pytest.fixture(scope="module")
def smoke_without_nginx(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> SmokeRun:
    """As on a machine without nginx (and, to be quick, without the Redis variant)."""
    return run_smoke(tmp_path_factory, redis_url, "--skip", "nginx", "--skip", "sidecar_redis")


def test_smoke_run_finishes_without_errors_and_says_it_was_a_smoke_run(smoke: SmokeRun) -> None:
    assert smoke.results["errors"] == {}
    assert smoke.results["mode"] == "smoke"
    assert smoke.results["schema"] == 1
    assert smoke.results["machine"]["nproc"] >= 1


def test_smoke_run_writes_only_its_own_file_and_never_the_recorded_results(
    smoke: SmokeRun,
) -> None:
    assert sorted(p.name for p in smoke.out_dir.iterdir()) == ["smoke.json"]


@pytest.mark.parametrize("scenario", sorted(MEASURED))
@pytest.mark.parametrize("target", ["direct", *LOADED_SIDECARS])
def test_every_load_scenario_has_a_number_for_the_direct_call_and_every_sidecar(
    smoke: SmokeRun, scenario: str, target: str
) -> None:
    value = _dig(smoke.results, *scenario.split("/"), "by_target", target, *MEASURED[scenario])
    assert _is_number(value), f"{scenario} {target}: {value!r}"


@pytest.mark.parametrize("scenario", sorted(MEASURED))
def test_nginx_columns_hold_numbers_or_are_null_with_a_reason(
    smoke: SmokeRun, scenario: str
) -> None:
    setup = smoke.results["setup"]
    value = _dig(smoke.results, *scenario.split("/"), "by_target", "nginx")
    if "nginx" in setup["targets"]:
        assert _is_number(_dig(value, *MEASURED[scenario]))
    else:
        assert value is None
        assert setup["skipped"]["nginx"]


@pytest.mark.parametrize("target", LOADED_SIDECARS)
def test_sidecars_report_added_latency_throughput_and_streams(smoke: SmokeRun, target: str) -> None:
    results = smoke.results
    assert _is_number(_dig(results, "latency_sequential", "added", target, "p99_ms"))
    assert _is_number(_dig(results, "latency_concurrent", "c64", "added", target, "p99_ms"))
    assert _is_number(_dig(results, "throughput", "all_cores_rps", target))
    assert _is_number(_dig(results, "throughput", "one_core_rps", target))
    assert _is_number(_dig(results, "sse", "added", target, "last_byte", "p50_ms"))
    assert isinstance(_dig(results, "sse", "by_target", target, "bytes_identical"), bool)


@pytest.mark.parametrize("scenario", sorted(MEASURED))
@pytest.mark.parametrize("floor", FLOORS)
def test_the_aiohttp_floor_is_measured_like_every_target_or_null_with_a_reason(
    smoke: SmokeRun, scenario: str, floor: str
) -> None:
    value = _dig(smoke.results, *scenario.split("/"), "by_target", floor)
    if floor in smoke.results["setup"]["targets"]:
        assert _is_number(_dig(value, *MEASURED[scenario]))
    else:
        assert value is None
        assert smoke.results["setup"]["skipped"][floor]


def test_cpu_per_call_is_reported_beside_the_floor_on_the_sidecars_own_loop(
    smoke: SmokeRun,
) -> None:
    throughput = smoke.results["throughput"]
    loop = smoke.results["setup"]["sidecar_loop"]
    assert loop in ("asyncio", "uvloop")
    assert throughput["floor"] == f"floor_{loop}"
    cpu = throughput["cpu_us_per_call_one_core"]
    for target in ("direct", throughput["floor"], *LOADED_SIDECARS):
        assert _is_number(cpu[target]), target
    # A ratio whenever the floor's clock ticks were not all zero in so short a run.
    if cpu[throughput["floor"]]:
        assert _is_number(throughput["cpu_vs_floor_one_core"]["sidecar"])


@pytest.mark.parametrize("target", SIDECARS)
def test_both_refresh_storms_report_refresh_calls_and_their_extra_latency(
    smoke: SmokeRun, target: str
) -> None:
    in_window = _dig(smoke.results, "refresh_storm", "by_target", target)
    for storm in (in_window, in_window["inside_wait_skew"]):
        assert storm["refresh_calls_per_round"], storm
        assert all(isinstance(n, int) for n in storm["refresh_calls_per_round"])
        assert _is_number(storm["extra_p99_ms"])
        assert storm["errors"] == 0
    assert in_window["callers_wait_for_the_refresh"] is False
    assert in_window["inside_wait_skew"]["callers_wait_for_the_refresh"] is True


@pytest.mark.parametrize("target", SIDECARS)
def test_memory_is_read_idle_with_connections_and_with_open_streams(
    smoke: SmokeRun, target: str
) -> None:
    memory = _dig(smoke.results, "memory", "by_target", target)
    for phase in ("idle_mb", "connections_mb", "streams_mb", "after_mb"):
        assert _is_number(memory[phase]), phase
    assert memory["open_streams_gauge"] == memory["count"]
    assert memory["failed_calls"] == memory["failed_streams"] == 0


def test_redis_variant_counts_round_trips_per_call_and_bytes_per_user(smoke: SmokeRun) -> None:
    trips = smoke.results["redis_round_trips"]
    assert _is_number(trips["round_trips_per_call"])
    assert trips["failures"] == 0
    for shape in smoke.results["redis_memory"]["by_token_shape"].values():
        assert _is_number(shape["memory_usage_per_user_bytes"])


def test_every_target_of_the_issue_gets_a_measured_verdict(smoke: SmokeRun) -> None:
    verdicts = smoke.results["verdicts"]
    assert {v["goal"] for v in verdicts} >= {
        "sequential_added_p50",
        "sequential_added_p99",
        "c64_added_p99",
        "throughput_vs_nginx_all_cores",
        "sse_added_ttfb_p50",
        "redis_round_trips",
        "storm_extra_p99",
        "storm_wait_extra_p99",
        "rss_streams",
    }
    for verdict in verdicts:
        if (
            verdict["goal"].startswith("throughput_vs_nginx")
            and "nginx" in smoke.results["setup"]["skipped"]
        ):
            assert verdict["measured"] is None
        else:
            assert _is_number(verdict["measured"]), verdict


def test_the_table_is_printed(smoke: SmokeRun) -> None:
    assert "| sequential p50 (ms)" in smoke.stdout
    assert "wrote " in smoke.stdout


def test_no_process_the_run_started_outlives_it(smoke: SmokeRun) -> None:
    survivors = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if cwd.startswith(str(smoke.tmp_dir)):
            survivors.append((proc.name, cwd))
    assert survivors == []


def test_the_run_leaves_no_key_in_redis(smoke: SmokeRun, redis_url: str) -> None:
    prefix = smoke.results["setup"]["key_prefix"]
    assert prefix.startswith("quota-sidecar-bench-")
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        assert list(client.scan_iter(match=f"{prefix}*", count=1000)) == []
    finally:
        client.close()


def test_without_nginx_the_run_succeeds_and_its_columns_are_null_with_the_reason(
    smoke_without_nginx: SmokeRun,
) -> None:
    results = smoke_without_nginx.results
    assert results["errors"] == {}
    assert results["setup"]["skipped"]["nginx"]
    assert results["setup"]["skipped"]["sidecar_redis"]
    assert "needs the Redis store" in results["setup"]["skipped"]["sidecar_workers"]
    for scenario in MEASURED:
        by_target = _dig(results, *scenario.split("/"), "by_target")
        assert by_target["nginx"] is None, scenario
        assert by_target["sidecar_redis"] is None, scenario
        assert by_target["sidecar_workers"] is None, scenario
        assert _is_number(_dig(by_target, "sidecar", *MEASURED[scenario])), scenario
    assert results["throughput"]["vs_nginx_all_cores"]["sidecar"] is None
    assert "skipped" in results["redis_round_trips"]
    assert "stub" in results["setup"]
