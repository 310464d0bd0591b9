"""Where the sidecar's time goes under load: py-spy samples, folded into shares of the whole.

``py-spy record`` samples the running ``sidecar`` process (memory store) while the load runner
keeps it busy at concurrency 16, and writes folded stacks (one line per distinct stack, with its
sample count). They are summarised three ways:

* areas: each sample goes to the innermost named area on its stack (logging, metrics, token
  lookup, forwarding, aiohttp's client and server, socket calls, the event loop), so the areas
  add up to the whole and the ranking of optimisations can point at a number;
* self time: the innermost frame of each sample, by function;
* the sidecar's own functions, inclusive (everything they call, counted once per sample).

Samples in which the process was idle (waiting in ``epoll``) are kept apart, so the shares are
of the time it was busy. Needs ``py-spy`` (``pip install py-spy``); skipped without it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.latency import LoadRunner

SAMPLE_RATE_HZ = 250
ATTACH_S = 1.0
TOP = 20
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]+?)(?::\d+)?\)$")
# Each busy sample goes to the area of its innermost frame that names one (first match wins),
# so the areas add up to 100 % of the busy time. Helpers any caller may use (json, re, hmac,
# uuid, …) name no area: their time goes to whoever called them.
AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "logging: access log line, JSON formatting, redaction, write",
        ("sidecar/access_log.py", "sidecar/log.py", "logging/"),
    ),
    (
        "metrics and timings (observe, prometheus_client)",
        ("sidecar/observe.py", "sidecar/metrics.py", "prometheus_client/"),
    ),
    (
        "token lookup: store get, AES-GCM open, record JSON",
        ("sidecar/tokens/", "cryptography/"),
    ),
    ("identity header and user-key HMAC", ("sidecar/identity.py",)),
    (
        "request-id and error middlewares, API-key guard",
        ("sidecar/middleware.py", "sidecar/app.py"),
    ),
    ("forwarding: URL checks, header filtering, relay loop", ("sidecar/forwarding/",)),
    (
        "aiohttp client: request to Quota, pool, response parsing, traces",
        (
            "aiohttp/client",
            "aiohttp/connector.py",
            "aiohttp/tracing.py",
            "aiohttp/cookiejar.py",
            "http/cookies.py",
            "aiohttp/payload.py",
        ),
    ),
    (
        "aiohttp server: parsing, routing, middlewares chain, response writing",
        ("aiohttp/", "aiosignal/", "multidict/", "yarl/"),
    ),
    ("socket send/recv (transport calls into the kernel)", ("asyncio/selector_events.py",)),
    ("event loop: scheduling tasks and callbacks", ("asyncio/", "_weakrefset.py")),
)
OTHER = "other"
_ENTRY = ("sidecar/__main__.py", "sidecar/cli.py")  # on every stack: says nothing
_TRANSPARENT = ("json/", "re/", "enum.py", "hmac.py", "hashlib", "uuid.py", "urllib/", "functools")


def binary() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    if beside.is_file():
        return str(beside)
    return shutil.which("py-spy")


def _frames(stack: str) -> list[tuple[str, str]]:
    """``func (file:line);…`` (outermost first) → [(function, file)], labels dropped."""
    out = []
    for text in stack.split(";"):
        found = _FRAME.match(text.strip())
        if found:
            out.append((found.group("func"), found.group("file")))
    return out


def _area(frames: list[tuple[str, str]]) -> str:
    for _, file in reversed(frames):
        if any(marker in file for marker in _TRANSPARENT):
            continue
        for area, markers in AREAS:
            if any(marker in file for marker in markers):
                return area
    return OTHER


def _idle(frames: list[tuple[str, str]]) -> bool:
    func, file = frames[-1]
    return file.endswith("selectors.py") and func.endswith(".select")


def summarise(folded: str) -> dict[str, Any]:
    self_time: Counter[str] = Counter()
    ours: Counter[str] = Counter()  # inclusive time of the sidecar's own functions
    areas: Counter[str] = Counter()
    busy = idle = 0
    for line in folded.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        frames = _frames(stack)
        if not frames:
            continue
        count = int(count_text)
        if _idle(frames):
            idle += count
            continue
        busy += count
        func, file = frames[-1]
        self_time[f"{func} ({file})"] += count
        areas[_area(frames)] += count
        for name in {
            f"{f} ({p})" for f, p in frames if p.startswith("sidecar/") and p not in _ENTRY
        }:
            ours[name] += count

    def shares(counter: Counter[str], top: int = TOP) -> list[dict[str, Any]]:
        return [
            {"frame": name, "pct": round(100 * n / busy, 1)} for name, n in counter.most_common(top)
        ]

    return {
        "samples_busy": busy,
        "samples_idle": idle,
        "idle_pct": round(100 * idle / (busy + idle), 1) if busy + idle else None,
        "areas_pct_of_busy": {
            area: round(100 * areas[area] / busy, 1) if busy else None
            for area in [*(a for a, _ in AREAS), OTHER]
        },
        "top_self": shares(self_time),
        "sidecar_functions_inclusive": shares(ours, 30),
    }


def record(runner: LoadRunner, *, duration_s: float, out_dir: Path) -> dict[str, Any]:
    spy = binary()
    if spy is None:
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    target = runner.rig.targets["sidecar"]
    out_dir.mkdir(parents=True, exist_ok=True)
    folded = out_dir / "profile-sidecar.folded"
    argv = [
        spy,
        "record",
        "--pid",
        str(target.pids[0]),
        "--rate",
        str(SAMPLE_RATE_HZ),
        "--duration",
        str(round(duration_s + ATTACH_S)),
        "--format",
        "raw",
        "--idle",
        "--nolineno",
        "--output",
        str(folded),
    ]
    spying = subprocess.Popen(  # noqa: S603 - argv is built here, no shell
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        time.sleep(ATTACH_S)
        load = runner.run("sidecar", 16, duration_s)
        _, err = spying.communicate(timeout=duration_s + 60)
    finally:
        if spying.poll() is None:
            spying.kill()
            spying.wait(timeout=10)
    if spying.returncode != 0 or not folded.is_file():
        return {"skipped": f"py-spy failed: {err.decode(errors='replace').strip()[-300:]}"}
    summary = summarise(folded.read_text(errors="replace"))
    return {
        "tool": "py-spy",
        "rate_hz": SAMPLE_RATE_HZ,
        "load": load.to_json(),
        "folded_stacks": folded.name,
        **summary,
    }
