"""The run's results: verdicts against the targets, a table for the terminal, the JSON files.

Targets are the issue's numbers, each checked for the sidecar variants (memory and Redis store,
and for latency, throughput and SSE the Redis one with ``--workers``) when they were measured. A verdict is ``True``/``False``, or ``None`` when the number is
missing (a target that was skipped, with its reason in the results).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.rig import ALL_SIDECARS, SIDECARS, TARGET_NAMES


@dataclass(frozen=True)
class Goal:
    key: str
    text: str
    limit: float
    unit: str
    higher_is_better: bool
    read: Callable[[dict[str, Any], str], float | None]
    variants: tuple[str, ...] = SIDECARS


def _dig(data: Any, *path: str) -> Any:
    for part in path:
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


# Where each storm's figures are: the one entering the window is the original shape.
STORM_IN_WINDOW: tuple[str, ...] = ()
STORM_INSIDE_WAIT_SKEW = ("inside_wait_skew",)


def _storm(r: dict[str, Any], v: str, variant: tuple[str, ...], *field: str) -> Any:
    return _dig(r, "refresh_storm", "by_target", v, *variant, *field)


def _storm_refreshes(variant: tuple[str, ...]) -> Callable[[dict[str, Any], str], float | None]:
    def read(r: dict[str, Any], v: str) -> float | None:
        calls = _storm(r, v, variant, "refresh_calls_per_round")
        return float(max(calls)) if calls else None

    return read


def _rechunked(r: dict[str, Any], v: str) -> float | None:
    """Chunks per paced stream that were not one whole event, beyond what the direct call saw
    (the stub's own front may merge two events when it is late; that is not the proxy's doing);
    a stream whose bytes differ counts as a whole stream re-chunked."""
    found, direct = _dig(r, "sse", "by_target", v), _dig(r, "sse", "by_target", "direct")
    streams = _dig(r, "sse", "paced_streams_per_target")
    if not found or not direct or not streams:
        return None
    extra = max(0, found["paced_chunks_not_one_event"] - direct["paced_chunks_not_one_event"])
    return float(extra / streams + (0 if found["bytes_identical"] else 1))


GOALS = (
    Goal(
        "sequential_added_p50",
        "added latency, sequential, p50",
        1.0,
        "ms",
        False,
        lambda r, v: _num(_dig(r, "latency_sequential", "added", v, "p50_ms")),
        ALL_SIDECARS,
    ),
    Goal(
        "sequential_added_p99",
        "added latency, sequential, p99",
        3.0,
        "ms",
        False,
        lambda r, v: _num(_dig(r, "latency_sequential", "added", v, "p99_ms")),
        ALL_SIDECARS,
    ),
    Goal(
        "paused_added_p50",
        "added latency, calls 5 ms apart, p50 (same limit; not in the issue)",
        1.0,
        "ms",
        False,
        lambda r, v: _num(_dig(r, "latency_sequential_paused", "added", v, "p50_ms")),
        ALL_SIDECARS,
    ),
    Goal(
        "c64_added_p99",
        "added latency at concurrency 64, p99",
        5.0,
        "ms",
        False,
        lambda r, v: _num(_dig(r, "latency_concurrent", "c64", "added", v, "p99_ms")),
        ALL_SIDECARS,
    ),
    Goal(
        "throughput_vs_nginx_all_cores",
        "throughput vs nginx, all cores",
        0.20,
        "x",
        True,
        lambda r, v: _num(_dig(r, "throughput", "vs_nginx_all_cores", v)),
        ALL_SIDECARS,
    ),
    Goal(
        "throughput_vs_nginx_one_core",
        "throughput vs nginx, one core",
        0.20,
        "x",
        True,
        lambda r, v: _num(_dig(r, "throughput", "vs_nginx_one_core", v)),
        ALL_SIDECARS,
    ),
    Goal(
        "sse_added_ttfb_p50",
        "SSE added time to first byte, p50",
        1.0,
        "ms",
        False,
        lambda r, v: _num(_dig(r, "sse", "added", v, "first_byte", "p50_ms")),
        ALL_SIDECARS,
    ),
    Goal(
        "sse_rechunked",
        "SSE chunks per stream not one event, beyond direct's",
        0,
        "",
        False,
        _rechunked,
        ALL_SIDECARS,
    ),
    Goal(
        "redis_round_trips",
        "Redis round-trips per billed call",
        1.0,
        "",
        False,
        lambda r, v: _num(_dig(r, "redis_round_trips", "round_trips_per_call")),
        ("sidecar_redis",),
    ),
    Goal(
        "storm_extra_p99",
        "refresh storm entering the window: extra p99 (refreshed in the background)",
        20.0,
        "ms",
        False,
        lambda r, v: _num(_storm(r, v, STORM_IN_WINDOW, "extra_p99_ms")),
    ),
    Goal(
        "storm_single_flight",
        "refresh storm entering the window: refresh calls per storm (most)",
        1.0,
        "",
        False,
        _storm_refreshes(STORM_IN_WINDOW),
    ),
    Goal(
        "storm_wait_extra_p99",
        "refresh storm inside the wait skew: waiters' extra p99",
        20.0,
        "ms",
        False,
        lambda r, v: _num(_storm(r, v, STORM_INSIDE_WAIT_SKEW, "extra_p99_ms")),
    ),
    Goal(
        "storm_wait_single_flight",
        "refresh storm inside the wait skew: refresh calls per storm (most)",
        1.0,
        "",
        False,
        _storm_refreshes(STORM_INSIDE_WAIT_SKEW),
    ),
    Goal(
        "rss_streams",
        "RSS with the open streams",
        80.0,
        "MB",
        False,
        lambda r, v: _num(_dig(r, "memory", "by_target", v, "streams_mb")),
    ),
)


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for goal in GOALS:
        for variant in goal.variants:
            measured = goal.read(results, variant)
            met = None
            if measured is not None:
                met = measured >= goal.limit if goal.higher_is_better else measured <= goal.limit
            out.append(
                {
                    "goal": goal.key,
                    "text": goal.text,
                    "variant": variant,
                    "limit": goal.limit,
                    "unit": goal.unit,
                    "measured": measured,
                    "met": met,
                    # How far inside (positive) or outside (negative) the limit.
                    "margin": None
                    if measured is None
                    else round(
                        (measured - goal.limit)
                        if goal.higher_is_better
                        else (goal.limit - measured),
                        4,
                    ),
                }
            )
    return out


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _row(label: str, values: dict[str, Any], digits: int = 3) -> list[str]:
    return [label, *(_cell(values.get(name), digits) for name in TARGET_NAMES)]


def table_rows(r: dict[str, Any]) -> list[list[str]]:
    """The table: one row per figure, one column per target."""

    def col(prefix: tuple[str, ...], *suffix: str) -> dict[str, Any]:
        return {name: _dig(r, *prefix, name, *suffix) for name in TARGET_NAMES}

    seq = ("latency_sequential", "by_target")
    seq_added = ("latency_sequential", "added")
    rows = [
        _row("sequential p50 (ms)", col(seq, "p50_ms")),
        _row("sequential p99 (ms)", col(seq, "p99_ms")),
        _row("  added p50 (ms)", col(seq_added, "p50_ms")),
        _row("  added p99 (ms)", col(seq_added, "p99_ms")),
        _row("5 ms apart p50 (ms)", col(("latency_sequential_paused", "by_target"), "p50_ms")),
        _row("  added p50 (ms)", col(("latency_sequential_paused", "added"), "p50_ms")),
        _row("  added p99 (ms)", col(("latency_sequential_paused", "added"), "p99_ms")),
    ]
    for level in ("c16", "c64"):
        measured = ("latency_concurrent", level, "by_target")
        rows += [
            _row(f"{level} p50 (ms)", col(measured, "p50_ms")),
            _row(f"{level} p99 (ms)", col(measured, "p99_ms")),
            _row("  added p99 (ms)", col(("latency_concurrent", level, "added"), "p99_ms")),
        ]
    rows += [
        _row("req/s, all cores (c64)", col(("throughput", "all_cores_rps")), 0),
        _row("req/s, one core (c64)", col(("throughput", "one_core_rps")), 0),
        _row("  share of nginx, all cores", col(("throughput", "vs_nginx_all_cores"))),
        _row("  share of nginx, one core", col(("throughput", "vs_nginx_one_core"))),
        _row("CPU per call, one core (µs)", col(("throughput", "cpu_us_per_call_one_core")), 1),
        _row("  times the aiohttp floor", col(("throughput", "cpu_vs_floor_one_core")), 2),
        _row("CPU per call, sequential (µs)", col(seq, "cpu_us_per_call"), 1),
    ]
    sse, sse_added = ("sse", "by_target"), ("sse", "added")
    rows += [
        _row("SSE first byte p50 (ms)", col(sse, "first_byte", "p50_ms")),
        _row("  added p50 (ms)", col(sse_added, "first_byte", "p50_ms")),
        _row("SSE last byte p50 (ms)", col(sse, "last_byte", "p50_ms")),
        _row("  added p50 (ms)", col(sse_added, "last_byte", "p50_ms")),
        _row("SSE back to back, last byte p50 (ms)", col(sse, "burst_last_byte", "p50_ms")),
        _row("  added p50 (ms)", col(sse_added, "burst_last_byte", "p50_ms")),
        _row("SSE bytes identical", col(sse, "bytes_identical")),
        _row("SSE paced chunks not one event", col(sse, "paced_chunks_not_one_event")),
    ]
    storm = ("refresh_storm", "by_target")
    rows += [
        _row("storm: refreshes per storm", col(storm, "refresh_calls_per_round")),
        _row("storm: baseline burst p99 (ms)", col(storm, "baseline_burst", "p99_ms")),
        _row("storm: storm burst p99 (ms)", col(storm, "storm_burst", "p99_ms")),
        _row("  extra p99, no caller waits (ms)", col(storm, "extra_p99_ms")),
    ]
    wait = STORM_INSIDE_WAIT_SKEW
    rows += [
        _row(
            "storm in wait skew: refreshes per storm", col(storm, *wait, "refresh_calls_per_round")
        ),
        _row(
            "storm in wait skew: baseline p99 (ms)", col(storm, *wait, "baseline_burst", "p99_ms")
        ),
        _row("storm in wait skew: storm p99 (ms)", col(storm, *wait, "storm_burst", "p99_ms")),
        _row("  waiters' extra p99 (ms)", col(storm, *wait, "extra_p99_ms")),
    ]
    memory = ("memory", "by_target")
    rows += [
        _row("RSS idle (MB)", col(memory, "idle_mb"), 1),
        _row("RSS + idle connections (MB)", col(memory, "connections_mb"), 1),
        _row("RSS + open streams (MB)", col(memory, "streams_mb"), 1),
        _row(
            "Redis round-trips per call",
            {"sidecar_redis": _dig(r, "redis_round_trips", "round_trips_per_call")},
        ),
    ]
    return rows


def render_table(results: dict[str, Any]) -> str:
    header = ["", *TARGET_NAMES]
    rows = table_rows(results)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_verdicts(checks: list[dict[str, Any]]) -> str:
    lines = []
    for check in checks:
        met = {True: "met   ", False: "MISSED", None: "n/a   "}[check["met"]]
        measured = "-" if check["measured"] is None else f"{check['measured']:.3f}"
        sign = ">=" if check["goal"].startswith("throughput") else "<="
        lines.append(
            f"{met} {check['text']} [{check['variant']}]: {measured} {check['unit']} "
            f"(target {sign} {check['limit']:g})"
        )
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """JSON has no NaN: an empty sample's statistics become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write(
    results: dict[str, Any], out_dir: Path, *, smoke: bool, stamp: str, label: str | None = None
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(results), indent=2, allow_nan=False, default=str) + "\n"
    if smoke:
        names = [f"smoke-{label}.json" if label else "smoke.json"]
    elif label:
        names = [f"{stamp}-{label}.json"]
    else:
        names = ["latest.json", f"{stamp}.json"]
    written = []
    for name in names:
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
