"""How many workers ``auto`` means, how a count is read, and what /metrics adds for workers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sidecar import __version__
from sidecar.metrics import Metrics
from sidecar.worker_metrics import WORKERS_FILE, FileMirror, WorkerProcesses, exposition_registry
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


WorkerFactory = Callable[[Path, int], tuple[Metrics, FileMirror]]


@pytest.fixture
def worker_metrics() -> Iterator[WorkerFactory]:
    """``worker_metrics(directory, pid)``: one worker's metrics and their files, closed after."""
    mirrors: list[FileMirror] = []

    def make(directory: Path, pid: int) -> tuple[Metrics, FileMirror]:
        metrics = Metrics(process=False)
        mirrors.append(FileMirror(metrics.instruments(), directory, pid))
        return metrics, mirrors[-1]

    yield make
    for mirror in mirrors:
        mirror.close()


def test_the_files_of_two_workers_add_up_to_one_sidecars_metrics(
    tmp_path: Path, worker_metrics: WorkerFactory
) -> None:
    first, first_files = worker_metrics(tmp_path, 101)
    second, second_files = worker_metrics(tmp_path, 102)
    alone = Metrics(process=False)  # one process doing both workers' work
    work = ((first, [0.002, 0.2], 1), (second, [0.03], 2), (alone, [0.002, 0.2, 0.03], 3))
    for metrics, calls, streams in work:
        for seconds in calls:
            metrics.requests.labels("internal", "v1", "200").inc()
            metrics.request_duration.labels("internal", "v1").observe(seconds)
        metrics.open_streams.labels("internal", "v1").inc(streams)
    first_files.write()
    second_files.write()
    summed = exposition_registry(first_files, tmp_path)

    def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    v1 = {"listener": "internal", "route": "v1"}
    for name, labels in [
        ("quota_sidecar_requests_total", {**v1, "status": "200"}),
        ("quota_sidecar_request_duration_seconds_count", v1),
        ("quota_sidecar_request_duration_seconds_sum", v1),
        ("quota_sidecar_request_duration_seconds_bucket", {**v1, "le": "0.005"}),
        ("quota_sidecar_request_duration_seconds_bucket", {**v1, "le": "0.05"}),
        ("quota_sidecar_request_duration_seconds_bucket", {**v1, "le": "+Inf"}),
        ("quota_sidecar_open_streams", v1),
    ]:
        assert value(summed, name, **labels) == pytest.approx(value(alone.registry, name, **labels))
    assert value(summed, "quota_sidecar_build_info", version=__version__) == 1


def test_a_dead_workers_counts_stay_and_its_live_gauges_go(
    tmp_path: Path, worker_metrics: WorkerFactory
) -> None:
    from prometheus_client import multiprocess

    live, live_files = worker_metrics(tmp_path, 201)
    dead, dead_files = worker_metrics(tmp_path, 202)
    for metrics in (live, dead):
        metrics.requests.labels("internal", "v1", "200").inc(5)
        metrics.open_streams.labels("internal", "v1").inc()
    live_files.write()
    dead_files.close()
    multiprocess.mark_process_dead(202, str(tmp_path))  # as the supervisor does
    summed = exposition_registry(live_files, tmp_path)
    labels = {"listener": "internal", "route": "v1"}
    assert (
        summed.get_sample_value("quota_sidecar_requests_total", {**labels, "status": "200"}) == 10
    )
    assert summed.get_sample_value("quota_sidecar_open_streams", labels) == 1


def test_a_scrape_copies_the_answering_workers_latest_figures_first(
    tmp_path: Path, worker_metrics: WorkerFactory
) -> None:
    metrics, files = worker_metrics(tmp_path, 301)
    summed = exposition_registry(files, tmp_path)
    labels = {"listener": "internal", "route": "v1", "status": "200"}
    metrics.requests.labels("internal", "v1", "200").inc(3)  # never copied by the timer
    assert summed.get_sample_value("quota_sidecar_requests_total", labels) == 3
