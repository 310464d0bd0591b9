"""SSE through each target: time to first and last byte, identical bytes, and event framing.

Two kinds of stream, both ``EVENTS`` events long, every byte compared (SHA-256) with what the
stub sent:

* paced, ``PACED_GAP_MS`` between events, as a model emits tokens. The headline figures: time
  to the first event and to the last byte, and whether every event still reaches the client as
  one HTTP chunk of its own, neither merged with the next nor split. A proxy that buffers
  re-chunks; one that forwards each read as it comes does not, as long as it keeps up.
* back to back (no gap): the whole stream arrives within a couple of milliseconds, which shows
  what relaying 200 chunks costs (added time to the last byte). A proxy that reads whatever has
  arrived forwards it as one chunk here, so chunk counts are reported, not judged; and its first
  byte can only leave once its own per-request work is done, by which time most of the stream
  may be in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from bench.http1 import Client, Exchange, build_request
from bench.procs import cpu_seconds
from bench.rig import CHAT_PATH, STREAM_BODY, TARGET_NAMES, Rig, stream_headers
from bench.stats import added, summary_ms
from bench.stub import DONE_EVENT, sse_event, stream_bytes

EVENTS = 200
PACED_GAP_MS = 1.0


def _request(port: int, **extra: str) -> bytes:
    return build_request(
        "POST",
        CHAT_PATH,
        port=port,
        headers=stream_headers(**{"X-Bench-Events": str(EVENTS), **extra}),
        body=STREAM_BODY,
    )


def _rotate(
    names: list[str], clients: dict[str, Client], wires: dict[str, bytes], rounds: int
) -> dict[str, list[Exchange]]:
    """``rounds`` streams per target, one target after the other in turn."""
    answers: dict[str, list[Exchange]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            answers[name].append(clients[name].exchange(wires[name], keep_frames=True))
    return answers


def _cpu_per_stream(rig: Rig, name: str, client: Client, wire: bytes, streams: int) -> float:
    """CPU seconds the target's processes spend per back-to-back stream (one target at a time,
    so the clock-tick counters cover only its streams)."""
    used = cpu_seconds(rig.targets[name].pids)
    for _ in range(streams):
        client.exchange(wire)
    return (cpu_seconds(rig.targets[name].pids) - used) / streams


def measure(
    rig: Rig, *, paced_streams: int, burst_streams: int, cpu_streams: int
) -> dict[str, Any]:
    names = [name for name in TARGET_NAMES if name in rig.targets]
    expected_hash = hashlib.sha256(stream_bytes(EVENTS)).hexdigest()
    expected_frames = [sse_event(i) for i in range(EVENTS)] + [DONE_EVENT]
    one_event = set(expected_frames)
    clients = {name: Client(rig.targets[name].port) for name in names}
    paced_wire = {
        name: _request(rig.targets[name].port, **{"X-Bench-Gap-Ms": str(PACED_GAP_MS)})
        for name in names
    }
    burst_wire = {name: _request(rig.targets[name].port) for name in names}
    try:
        _rotate(names, clients, burst_wire, 1)  # warm-up: connections, first-call paths
        paced = _rotate(names, clients, paced_wire, paced_streams)
        burst = _rotate(names, clients, burst_wire, burst_streams)
        cpu = {
            name: _cpu_per_stream(rig, name, clients[name], burst_wire[name], cpu_streams)
            for name in names
        }
    finally:
        for client in clients.values():
            client.close()

    def times(answers: list[Exchange], pick: Callable[[Exchange], float]) -> dict[str, float]:
        return summary_ms([pick(a) for a in answers])

    by_target: dict[str, Any] = {}
    for name in names:
        every = paced[name] + burst[name]
        burst_frames = sorted(len(a.frames) for a in burst[name])
        by_target[name] = {
            "first_byte": times(paced[name], lambda a: a.first_byte_s),
            "last_byte": times(paced[name], lambda a: a.total_s),
            "bytes_identical": {hashlib.sha256(a.body).hexdigest() for a in every}
            == {expected_hash},
            "failed": sum(1 for a in every if a.status != 200),
            "paced_frames": [len(a.frames) for a in paced[name]],
            "paced_streams_rechunked": sum(1 for a in paced[name] if a.frames != expected_frames),
            # Chunks that were not exactly one event (two merged, or part of one).
            "paced_chunks_not_one_event": sum(
                1 for a in paced[name] for frame in a.frames if frame not in one_event
            ),
            "burst_first_byte": times(burst[name], lambda a: a.first_byte_s),
            "burst_last_byte": times(burst[name], lambda a: a.total_s),
            "burst_frames_median": burst_frames[len(burst_frames) // 2] if burst_frames else None,
            "cpu_us_per_stream": round(cpu[name] * 1e6, 1),
        }
    direct = by_target.get("direct")
    added_by: dict[str, Any] = {}
    for name in TARGET_NAMES:
        found = by_target.get(name)
        if name == "direct":
            continue
        added_by[name] = (
            None
            if found is None or direct is None
            else {
                key: added(found[key], direct[key])
                for key in ("first_byte", "last_byte", "burst_first_byte", "burst_last_byte")
            }
        )
    return {
        "events": EVENTS,
        "paced_gap_ms": PACED_GAP_MS,
        "paced_streams_per_target": paced_streams,
        "burst_streams_per_target": burst_streams,
        "cpu_streams_per_target": cpu_streams,
        "expected_chunks": len(expected_frames),
        "expected_sha256": expected_hash,
        "by_target": {name: by_target.get(name) for name in TARGET_NAMES},
        "added": added_by,
    }
