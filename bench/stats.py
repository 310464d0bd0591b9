"""Summaries of latency samples: percentiles, and a proxy's cost over the direct call."""

from __future__ import annotations

from collections.abc import Sequence


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of sorted samples, interpolated linearly (numpy's default)."""
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """n, p50, p90, p99, max and mean of samples given in seconds, in milliseconds."""
    ordered = sorted(samples_s)
    return {
        "n": len(ordered),
        "p50_ms": round(percentile(ordered, 50) * 1000, 4),
        "p90_ms": round(percentile(ordered, 90) * 1000, 4),
        "p99_ms": round(percentile(ordered, 99) * 1000, 4),
        "max_ms": round(ordered[-1] * 1000, 4) if ordered else float("nan"),
        "mean_ms": round(sum(ordered) / len(ordered) * 1000, 4) if ordered else float("nan"),
    }


def added(
    through: dict[str, float] | None,
    direct: dict[str, float] | None,
    keys: Sequence[str] = ("p50_ms", "p99_ms"),
) -> dict[str, float] | None:
    """What a proxy adds at each percentile: its figure less the direct call's."""
    if through is None or direct is None:
        return None
    return {key: round(through[key] - direct[key], 4) for key in keys}


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return round(value / reference, 4)
