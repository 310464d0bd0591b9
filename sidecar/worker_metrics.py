"""Metrics of several worker processes, summed: what ``/metrics`` shows under ``--workers N``.

Each worker keeps its instruments in its own memory (``sidecar.instruments``, no locks) and
copies them into its own files in one shared directory, in prometheus_client's multiprocess
format, every ``MIRROR_INTERVAL_S``, before it answers a scrape, and once more as it exits.
Whichever worker answers a scrape reads every file, so each scrape sees the whole sidecar
whatever worker the kernel handed it to (another worker's figures may be up to
``MIRROR_INTERVAL_S`` old; Prometheus scrapes every 15 s or so):

    counters, histograms   summed over every worker that ever ran, the dead included, so a
                           replaced worker does not make a counter go backwards (a worker that
                           is killed loses what it counted since its last copy)
    gauges                 by their ``multiprocess_mode`` (``sidecar.metrics``): open streams
                           and queue depths are summed over live workers, build_info is the max
    process_*              one series per live worker, labelled ``worker="<index>"`` (and
                           ``worker="supervisor"``), read from ``/proc`` with the pids the
                           supervisor writes to ``workers.json``; Python's GC collector is
                           left out (it only sees the answering process)
    quota_sidecar_workers, quota_sidecar_worker_restarts_total   from the same file

Copying on a timer instead of prometheus_client's own multiprocess values keeps the per-call
cost of a metric update the same with one worker or many: those take a lock and write the file
on every update.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from sidecar.instruments import Gauge, Instrument
from sidecar.metrics import PREFIX

WORKERS_FILE = "workers.json"  # written by sidecar.workers.Supervisor
DIRECTORY_ENV = "PROMETHEUS_MULTIPROC_DIR"  # the directory, when an operator names it


# How often a worker copies its instruments to its files.
MIRROR_INTERVAL_S = 1.0


class FileMirror:
    """Copies one worker's instruments into its multiprocess files (one per kind and mode)."""

    def __init__(self, instruments: Iterable[Instrument[Any]], directory: Path, pid: int) -> None:
        self._instruments = list(instruments)
        self._directory = directory
        self._pid = pid
        self._files: dict[str, MmapedDict] = {}
        self._keys: dict[tuple[str, tuple[str, ...]], str] = {}

    def _file(self, instrument: Instrument[Any]) -> MmapedDict:
        prefix = instrument.kind
        if isinstance(instrument, Gauge):
            prefix = f"gauge_{instrument.multiprocess_mode}"
        mapped = self._files.get(prefix)
        if mapped is None:
            path = self._directory / f"{prefix}_{self._pid}.db"
            mapped = self._files[prefix] = MmapedDict(str(path))  # type: ignore[no-untyped-call]
        return mapped

    def write(self) -> None:
        for instrument in self._instruments:
            mapped = self._file(instrument)
            for family, sample, names, values, value in instrument.shared():
                key = self._keys.get((sample, values))
                if key is None:
                    key = self._keys[(sample, values)] = mmap_key(
                        family, sample, list(names), list(values), instrument.documentation
                    )
                mapped.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """The last copy, then the files closed (the figures stay for the other workers)."""
        self.write()
        for mapped in self._files.values():
            mapped.close()  # type: ignore[no-untyped-call]
        self._files.clear()

    async def run(self) -> None:
        """Copy every ``MIRROR_INTERVAL_S`` until cancelled."""
        while True:
            await asyncio.sleep(MIRROR_INTERVAL_S)
            self.write()


class _FreshFirst(Collector):
    """Every worker's files, this worker's own copied first: a scrape always sees the latest
    calls of the worker it landed on."""

    def __init__(self, mirror: FileMirror, directory: Path) -> None:
        self._mirror = mirror
        self._files = MultiProcessCollector(None, path=str(directory))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        self._mirror.write()
        return self._files.collect()  # type: ignore[no-any-return,no-untyped-call]


def exposition_registry(mirror: FileMirror, directory: Path) -> CollectorRegistry:
    """What ``/metrics`` renders: every worker's files, their processes, the platform."""
    registry = CollectorRegistry()
    registry.register(_FreshFirst(mirror, directory))
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
