"""The sidecar's resident memory: idle, holding many idle keep-alive connections, many open streams.

Read from ``VmRSS`` in ``/proc/<pid>/status``, in this order, each after a short settle:

    idle          once started and its users connected, before any load
    connections   N client connections, each having made one billed call, then left open
    streams       (those closed) N SSE streams open at once: each has sent its first event and
                  the stub holds it open; the sidecar's ``open_streams`` gauge confirms N
    after         all closed again (what the process keeps once the crowd is gone)

And where the idle figure comes from: ``import_cost`` imports the sidecar's dependencies one by
one in a fresh interpreter and reads its RSS after each. ``store_per_user`` is what each
connected user costs in the memory store (``tracemalloc``, sealed records as the sidecar holds
them, under their HMAC keys).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import tracemalloc
from typing import Any

from bench.http1 import Client, build_request
from bench.procs import rss_bytes
from bench.rig import (
    CHAT_BODY,
    CHAT_PATH,
    SIDECARS,
    STREAM_BODY,
    Rig,
    chat_headers,
    stream_headers,
)
from bench.storm import open_many

SETTLE_S = 0.5
HOLD_S = 60  # the stub keeps each stream open this long at most; the bench closes them sooner
PHASE_TIMEOUT_S = 60.0
MB = 1024 * 1024
_OPEN_STREAMS = re.compile(
    r'^quota_sidecar_open_streams\{listener="internal",route="v1"\}\s+([0-9.e+]+)$', re.MULTILINE
)


# In the order the sidecar's own imports pull them in; each step adds what is new.
IMPORT_STEPS = (
    "asyncio",
    "aiohttp.web",
    "multidict, yarl",
    "yaml",
    "cryptography.hazmat.primitives.ciphers.aead",
    "cryptography.fernet",
    "redis.asyncio",
    "prometheus_client",
    "aiohttp_session",
    "sidecar.app",
    "sidecar.cli",
)
_IMPORT_SCRIPT = """
import importlib, json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
steps = [("python", rss())]
for step in sys.argv[1:]:
    for name in step.split(", "):
        importlib.import_module(name)
    steps.append((step, rss()))
print(json.dumps(steps))
"""


def import_cost() -> dict[str, Any]:
    """RSS of a fresh interpreter, then the growth each dependency's import adds (MB)."""
    done = subprocess.run(  # noqa: S603 - this interpreter, a fixed script, no shell
        [sys.executable, "-c", _IMPORT_SCRIPT, *IMPORT_STEPS],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    steps = json.loads(done.stdout)
    growth = {
        name: round((rss - steps[i - 1][1]) / MB, 1) if i else round(rss / MB, 1)
        for i, (name, rss) in enumerate(steps)
    }
    return {"total_mb": round(steps[-1][1] / MB, 1), "growth_mb": growth}


def store_per_user(rig: Rig, *, users: int) -> dict[str, Any]:
    from sidecar.config_loader import build_config
    from sidecar.services import USER_KEY_LABEL, make_sealer
    from sidecar.tokens.crypto import UserKeys, derive_key
    from sidecar.tokens.memory import MemoryTokenStore
    from sidecar.tokens.model import TokenRecord

    config = build_config(
        {
            "quota": {"client_id": "bench", "client_secret": "bench"},
            "session": {"secret": rig.session_secret},
        },
        env={},
    )
    sealer = make_sealer(config)
    user_keys = UserKeys(derive_key(rig.session_secret.encode(), USER_KEY_LABEL))
    now = time.time()

    async def fill(store: MemoryTokenStore) -> None:
        for i in range(users):
            record = TokenRecord(
                access_token=f"quota_token_{i:032d}",
                refresh_token=f"quota_refresh_{i:032d}",
                expires_at=now + 3600,
                scope="credits.read credits.spend",
                obtained_at=now,
            )
            await store.put(user_keys.key_for(f"user-{i}"), record)

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = MemoryTokenStore(sealer)
        asyncio.run(fill(store))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return {"users": users, "bytes_per_user": round(held / users)}


def record_idle(rig: Rig, *, settle_s: float = SETTLE_S) -> None:
    """Note each sidecar's RSS now: call once they are started, before any load."""
    time.sleep(settle_s)
    for name in SIDECARS:
        if name in rig.targets:
            rig.idle_rss[name] = rss_bytes(rig.targets[name].pids[0])


def _open_streams_gauge(admin_port: int) -> float | None:
    client = Client(admin_port, timeout_s=5)
    try:
        answer = client.exchange(build_request("GET", "/metrics", port=admin_port))
    finally:
        client.close()
    found = _OPEN_STREAMS.search(answer.body.decode("utf-8", "replace"))
    return float(found.group(1)) if found else None


async def _phases(rig: Rig, name: str, count: int, settle_s: float) -> dict[str, Any]:
    target = rig.targets[name]
    assert target.sidecar is not None
    pid, port = target.pids[0], target.port
    plain = build_request("POST", CHAT_PATH, port=port, headers=chat_headers(), body=CHAT_BODY)
    held = build_request(
        "POST",
        CHAT_PATH,
        port=port,
        headers=stream_headers(**{"X-Bench-Hold-S": str(HOLD_S)}),
        body=STREAM_BODY,
    )
    async with asyncio.timeout(PHASE_TIMEOUT_S):
        before_connections = rss_bytes(pid)
        clients = await open_many(port, count)
        try:
            answers = await asyncio.gather(*(c.exchange(plain) for c in clients))
            await asyncio.sleep(settle_s)
            with_connections = rss_bytes(pid)
        finally:
            for client in clients:
                client.close()
        await asyncio.sleep(settle_s)
        before_streams = rss_bytes(pid)
        clients = await open_many(port, count)
        try:
            firsts = await asyncio.gather(*(c.exchange(held, first_only=True) for c in clients))
            await asyncio.sleep(settle_s)
            with_streams = rss_bytes(pid)
            gauge = _open_streams_gauge(target.sidecar.admin_port)
        finally:
            for client in clients:
                client.close()
        await asyncio.sleep(2 * settle_s)
    return {
        "count": count,
        "idle_mb": round(rig.idle_rss[name] / MB, 1) if name in rig.idle_rss else None,
        "connections_mb": round(with_connections / MB, 1),
        "streams_mb": round(with_streams / MB, 1),
        "after_mb": round(rss_bytes(pid) / MB, 1),
        # Growth while each crowd was open, over what the process held just before it.
        "before_connections_mb": round(before_connections / MB, 1),
        "per_connection_kb": round((with_connections - before_connections) / count / 1024, 1),
        "per_stream_kb": round((with_streams - before_streams) / count / 1024, 1),
        "open_streams_gauge": gauge,
        "failed_calls": sum(1 for a in answers if a.status != 200),
        "failed_streams": sum(1 for a in firsts if a.status != 200),
    }


def measure(rig: Rig, *, count: int, settle_s: float = SETTLE_S) -> dict[str, Any]:
    return {
        "settle_s": settle_s,
        "imports": import_cost(),
        "by_target": {
            name: asyncio.run(_phases(rig, name, count, settle_s)) if name in rig.targets else None
            for name in SIDECARS
        },
    }
