"""How many workers ``auto`` means, how a count is read, and what /metrics adds for workers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sidecar.worker_metrics import WORKERS_FILE, WorkerProcesses
from sidecar.workers import cgroup_cpu_quota, cpu_count, parse_workers


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "200000 100000\n"}, 2.0),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
        ({"cpu.max": "garbage"}, None),
    ],
    ids=["v2-two", "v2-fraction", "v2-unlimited", "v1-half", "v1-unlimited", "none", "unreadable"],
)
def test_the_cgroup_quota_is_read_from_v2_then_v1(
    tmp_path: Path, files: dict[str, str], expected: float | None
) -> None:
    assert cgroup_cpu_quota(_cgroup(tmp_path, files)) == expected


def test_auto_is_the_affinity_capped_by_the_quota_rounded_up(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    assert cpu_count(_cgroup(tmp_path / "none", {})) == cpus
    assert cpu_count(_cgroup(tmp_path / "half", {"cpu.max": "50000 100000"})) == 1
    assert cpu_count(_cgroup(tmp_path / "wide", {"cpu.max": f"{(cpus + 8) * 100000} 100000"})) == (
        cpus
    )
    if cpus >= 2:
        assert cpu_count(_cgroup(tmp_path / "1.5", {"cpu.max": "150000 100000"})) == 2


@pytest.mark.parametrize(("text", "count"), [("1", 1), ("4", 4), (" 2 ", 2), ("256", 256)])
def test_a_worker_count_is_a_number_from_1_to_256(text: str, count: int) -> None:
    assert parse_workers(text) == count


def test_auto_workers_is_the_cpu_count() -> None:
    assert parse_workers("auto") == parse_workers("AUTO") == cpu_count()


@pytest.mark.parametrize("text", ["0", "-2", "257", "1.5", "", "many"])
def test_a_bad_worker_count_names_the_setting(text: str) -> None:
    with pytest.raises(ValueError, match=r"QUOTA_SIDECAR_WORKERS / --workers: must be a number"):
        parse_workers(text)


def test_metrics_name_each_live_worker_and_count_restarts(tmp_path: Path) -> None:
    (tmp_path / WORKERS_FILE).write_text(
        json.dumps({"supervisor": os.getppid(), "workers": {"0": os.getpid()}, "restarts": 3})
    )
    registry = CollectorRegistry()
    registry.register(WorkerProcesses(tmp_path))
    text = generate_latest(registry).decode()
    assert "quota_sidecar_workers 1.0" in text
    assert "quota_sidecar_worker_restarts_total 3.0" in text
    assert 'process_resident_memory_bytes{worker="0"}' in text
    assert 'process_cpu_seconds_total{worker="supervisor"}' in text
    assert (
        registry.get_sample_value("process_open_fds", {"worker": "0"})
        == len(os.listdir("/proc/self/fd")) - 1
        or registry.get_sample_value("process_open_fds", {"worker": "0"}) is not None
    )


def test_metrics_without_a_workers_file_report_no_workers(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    registry.register(WorkerProcesses(tmp_path))
    assert registry.get_sample_value("quota_sidecar_workers") == 0
    assert registry.get_sample_value("process_resident_memory_bytes", {"worker": "0"}) is None
