"""Counters, gauges and histograms for one event loop: prometheus_client's exposition, no locks.

prometheus_client's instruments can be updated from any thread, so each update takes a lock and
runs a few checks, which cost several times the arithmetic itself; a billed call makes about a
dozen updates. The sidecar updates and scrapes its metrics on its event loop's thread only, so
these instruments do the arithmetic alone. What a scrape sees is the same: the same families,
samples, labels, ``_created`` series and order, in the text format and in OpenMetrics (a test
compares them with prometheus_client's own). Use them from the loop's thread only.

The subset the sidecar uses: ``labels(*values)`` (children kept for the process's life),
``inc``, ``dec``, ``set`` and ``observe``, on labelled or unlabelled instruments.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterable, Sequence
from typing import ClassVar, Generic, TypeVar

import prometheus_client.metrics
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

Sampled = tuple[str, dict[str, str], float]  # suffix, extra labels, value


def _created_series() -> bool:
    # prometheus_client's own switch (PROMETHEUS_DISABLE_CREATED_SERIES, disable_created_metrics).
    return bool(prometheus_client.metrics._use_created)


class CounterChild:
    __slots__ = ("_created", "_value")

    def __init__(self) -> None:
        self._value = 0.0
        self._created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self._value += amount

    def samples(self) -> Iterable[Sampled]:
        yield "_total", {}, self._value
        if _created_series():
            yield "_created", {}, self._created

    def shared_samples(self) -> Iterable[Sampled]:
        yield "_total", {}, self._value


class GaugeChild:
    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = 0.0

    def inc(self, amount: float = 1) -> None:
        self._value += amount

    def dec(self, amount: float = 1) -> None:
        self._value -= amount

    def set(self, value: float) -> None:
        self._value = float(value)

    def samples(self) -> Iterable[Sampled]:
        yield "", {}, self._value

    def shared_samples(self) -> Iterable[Sampled]:
        yield "", {}, self._value


class HistogramChild:
    __slots__ = ("_bounds", "_counts", "_created", "_les", "_sum")

    def __init__(self, bounds: tuple[float, ...], les: tuple[str, ...]) -> None:
        self._bounds = bounds
        self._les = les  # each bound as the le label writes it
        self._counts = [0.0] * len(bounds)  # per bucket, not yet cumulated
        self._sum = 0.0
        self._created = time.time()

    def observe(self, amount: float) -> None:
        self._sum += amount
        if amount <= self._bounds[-1]:  # as prometheus_client: NaN lands in no bucket
            self._counts[bisect.bisect_left(self._bounds, amount)] += 1

    def samples(self) -> Iterable[Sampled]:
        total = 0.0
        for le, count in zip(self._les, self._counts, strict=True):
            total += count
            yield "_bucket", {"le": le}, total
        yield "_count", {}, total
        if self._bounds[0] >= 0:
            yield "_sum", {}, self._sum
        if _created_series():
            yield "_created", {}, self._created

    def shared_samples(self) -> Iterable[Sampled]:
        # As prometheus_client's multiprocess files hold a histogram: each bucket's own count
        # (the reader cumulates them and makes _count), and the sum.
        for le, count in zip(self._les, self._counts, strict=True):
            yield "_bucket", {"le": le}, count
        yield "_sum", {}, self._sum


Child = TypeVar("Child", CounterChild, GaugeChild, HistogramChild)


class Instrument(Collector, Generic[Child]):
    """One metric family: its children by label values, collected as prometheus_client does."""

    kind: ClassVar[str]

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Child] = {}
        if not self._labelnames:
            self._children[()] = self._child()
        registry.register(self)

    def _child(self) -> Child:
        raise NotImplementedError

    def labels(self, *values: object) -> Child:
        key = tuple(str(value) for value in values)
        child = self._children.get(key)
        if child is None:
            if not self._labelnames or len(key) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}, got {key}")
            child = self._children[key] = self._child()
        return child

    def _only(self) -> Child:
        if self._labelnames:
            raise ValueError(f"{self._name} metric is missing label values")
        return self._children[()]

    def describe(self) -> Iterable[Metric]:
        return [Metric(self._name, self._documentation, self.kind)]

    def shared(self) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...], float]]:
        """Every sample as prometheus_client's multiprocess files keep it: ``(family, sample,
        label names, label values, value)`` (``sidecar.worker_metrics`` copies them there)."""
        found = []
        for key, child in self._children.items():
            for suffix, labels, value in child.shared_samples():
                names = self._labelnames + tuple(labels)
                found.append(
                    (self._name, self._name + suffix, names, key + tuple(labels.values()), value)
                )
        return found

    @property
    def documentation(self) -> str:
        return self._documentation

    def collect(self) -> Iterable[Metric]:
        metric = Metric(self._name, self._documentation, self.kind)
        for key, child in self._children.items():
            series = dict(zip(self._labelnames, key, strict=True))
            for suffix, labels, value in child.samples():
                metric.add_sample(self._name + suffix, {**series, **labels}, value)
        return [metric]


class Counter(Instrument[CounterChild]):
    kind = "counter"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        # As prometheus_client: the family is named without _total, its sample with it.
        super().__init__(name.removesuffix("_total"), documentation, labelnames, registry=registry)

    def _child(self) -> CounterChild:
        return CounterChild()

    def inc(self, amount: float = 1) -> None:
        self._only().inc(amount)


class Gauge(Instrument[GaugeChild]):
    """``multiprocess_mode``: how ``--workers`` sums it, as prometheus_client's ``Gauge`` takes."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
        multiprocess_mode: str = "all",
    ) -> None:
        self.multiprocess_mode = multiprocess_mode
        super().__init__(name, documentation, labelnames, registry=registry)

    def _child(self) -> GaugeChild:
        return GaugeChild()

    def inc(self, amount: float = 1) -> None:
        self._only().inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._only().dec(amount)

    def set(self, value: float) -> None:
        self._only().set(value)


class Histogram(Instrument[HistogramChild]):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = [float(bound) for bound in buckets]
        if bounds != sorted(bounds):
            raise ValueError("Buckets not in sorted order")
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        if len(bounds) < 2:
            raise ValueError("Must have at least two buckets")
        self._bounds = tuple(bounds)
        self._les = tuple(floatToGoString(bound) for bound in bounds)  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry=registry)

    def _child(self) -> HistogramChild:
        return HistogramChild(self._bounds, self._les)

    def observe(self, amount: float) -> None:
        self._only().observe(amount)
