"""The loop's own instruments expose exactly what prometheus_client's do for the same updates."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from sidecar import instruments

BUCKETS = (0.005, 0.01, 0.5, 2.5)


def _exercise(kinds: Any) -> CollectorRegistry:
    """The same families and updates, on prometheus_client's classes or on ours."""
    registry = CollectorRegistry(auto_describe=True)
    requests = kinds.Counter("t_requests", "Requests.", ["route", "status"], registry=registry)
    started = kinds.Counter("t_started_total", "Started.", registry=registry)
    streams = kinds.Gauge("t_streams", "Open.", ["route"], registry=registry)
    depth = kinds.Gauge("t_depth", "Depth.", registry=registry)
    duration = kinds.Histogram(
        "t_duration_seconds", "Time.", ["route"], buckets=BUCKETS, registry=registry
    )
    wait = kinds.Histogram("t_wait_seconds", "Wait.", buckets=(1, 5, math.inf), registry=registry)
    requests.labels("v1", 200).inc()
    requests.labels("v1", "200").inc(2.5)
    requests.labels("auth", 302)  # a zero series
    started.inc()
    streams.labels("v1").inc()
    streams.labels("v1").inc(3)
    streams.labels("v1").dec()
    streams.labels("proxy")
    depth.set(7)
    for amount in (0.0, 0.005, 0.0051, 0.3, 2.5, 99.0, math.inf, math.nan, -1.0):
        duration.labels("v1").observe(amount)
    duration.labels("auth")
    wait.observe(2)
    return registry


@pytest.mark.parametrize("encode", [generate_latest, generate_openmetrics])
@pytest.mark.parametrize("created", [True, False])
def test_a_scrape_reads_the_same_as_prometheus_clients_own(
    encode: Callable[[CollectorRegistry], bytes],
    created: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("time.time", lambda: 1_800_000_000.25)  # every _created alike
    if not created:
        prometheus_client.disable_created_metrics()
    try:
        theirs = encode(_exercise(prometheus_client))
        ours = encode(_exercise(instruments))
    finally:
        prometheus_client.enable_created_metrics()
    assert ours.decode() == theirs.decode()


@pytest.mark.parametrize(
    ("misuse", "says"),
    [
        (lambda r: instruments.Counter("c", "C.", ["a"], registry=r).labels("x", "y"), "labels"),
        (lambda r: instruments.Counter("c", "C.", ["a"], registry=r).inc(), "label values"),
        (lambda r: instruments.Counter("c", "C.", registry=r).labels("x"), "labels"),
        (lambda r: instruments.Counter("c", "C.", registry=r).inc(-1), "non-negative"),
        (lambda r: instruments.Histogram("h", "H.", buckets=(2, 1), registry=r), "sorted"),
    ],
)
def test_misuse_is_refused_as_prometheus_client_refuses_it(
    misuse: Callable[[CollectorRegistry], object], says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        misuse(CollectorRegistry())
