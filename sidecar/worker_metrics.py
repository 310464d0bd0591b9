"""Metrics of several worker processes, summed: what ``/metrics`` shows under ``--workers N``.

Each worker records into memory-mapped files in one directory (prometheus_client's multiprocess
mode), and whichever worker answers a scrape reads them all, so every scrape sees the whole
sidecar whatever worker the kernel handed it to:

    counters, histograms   summed over every worker that ever ran, the dead included, so a
                           replaced worker does not make a counter go backwards
    gauges                 by their ``multiprocess_mode`` (``sidecar.metrics``): open streams
                           and queue depths are summed over live workers, build_info is the max
    process_*              one series per live worker, labelled ``worker="<index>"`` (and
                           ``worker="supervisor"``), read from ``/proc`` with the pids the
                           supervisor writes to ``workers.json``; Python's GC collector is
                           left out (it only sees the answering process)
    quota_sidecar_workers, quota_sidecar_worker_restarts_total   from the same file
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, values
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from sidecar.metrics import PREFIX

WORKERS_FILE = "workers.json"  # written by sidecar.workers.Supervisor
DIRECTORY_ENV = "PROMETHEUS_MULTIPROC_DIR"  # where prometheus_client's files go


def record_to_files(directory: Path) -> None:
    """From now on, every metric this process creates records into ``directory``.

    Called once in a fresh worker, before its ``Metrics`` exist: prometheus_client picks the
    class of every value when the metric is made, and the file's directory from the environment.
    """
    os.environ[DIRECTORY_ENV] = str(directory)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def exposition_registry(directory: Path) -> CollectorRegistry:
    """What ``/metrics`` renders: every worker's files, their processes, the platform."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    registry.register(WorkerProcesses(directory))
    PlatformCollector(registry=registry)
    return registry


class WorkerProcesses(Collector):
    """``process_*`` per live worker and the supervisor, and the worker count and restarts."""

    def __init__(self, directory: Path) -> None:
        self._file = directory / WORKERS_FILE

    def _read(self) -> tuple[dict[str, int], int]:
        try:
            doc = json.loads(self._file.read_text())
        except (OSError, ValueError):
            return {}, 0
        pids = {str(index): int(pid) for index, pid in doc.get("workers", {}).items()}
        if "supervisor" in doc:
            pids["supervisor"] = int(doc["supervisor"])
        return pids, int(doc.get("restarts", 0))

    def collect(self) -> Iterable[Metric]:
        pids, restarts = self._read()
        live = sum(1 for name in pids if name != "supervisor")
        yield GaugeMetricFamily(
            f"{PREFIX}_workers", "Worker processes serving now (run --workers).", value=live
        )
        yield CounterMetricFamily(
            f"{PREFIX}_worker_restarts",
            "Workers replaced after dying while they served.",
            value=restarts,
        )
        families: dict[str, Metric] = {}
        for name, pid in sorted(pids.items()):
            for family in ProcessCollector(pid=_constant(pid), registry=None).collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type
                    )
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "worker": name}, sample.value)
        yield from families.values()


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid
