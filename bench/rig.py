"""Everything under test, started together: the stub, nginx (front and reference), the sidecars.

    bench ──► direct         = the stub: nginx front (plain JSON) + aiohttp stub (SSE, OAuth)
          ──► nginx          = reference proxy (fixed bearer) ──► the stub
          ──► floor_asyncio  = the aiohttp floor (bench/floor.py) on asyncio ──► the stub
          ──► floor_uvloop   = the same on uvloop ──► the stub
          ──► sidecar        = python -m sidecar run, memory store ──► the stub
          ──► sidecar_redis  = the same with a Redis store ──► the stub
          ──► sidecar_workers = the same with --workers auto (one per CPU) ──► the stub

Without nginx the aiohttp stub answers everything itself and the ``nginx`` target is skipped
with its reason; without a Redis that answers, ``sidecar_redis`` is; without uvloop,
``floor_uvloop`` is. All on loopback.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench import nginx
from bench.http1 import Client, build_request
from bench.procs import Child, Children, free_port, wait_listening
from bench.sidecar_proc import SidecarTarget, connect_users, new_session_secret, start_sidecar
from bench.stub import CHAT_JSON

START_TIMEOUT_S = 15.0
STUB_SCRIPT = Path(__file__).with_name("stub.py")
FLOOR_SCRIPT = Path(__file__).with_name("floor.py")
TARGET_NAMES = (
    "direct", "nginx", "floor_asyncio", "floor_uvloop", "sidecar", "sidecar_redis",
    "sidecar_workers",
)  # fmt: skip
SIDECARS = ("sidecar", "sidecar_redis")  # one process each: storms, memory, Redis costs
# Every sidecar target, for what is measured on all of them (latency, throughput, SSE).
ALL_SIDECARS = (*SIDECARS, "sidecar_workers")
FLOORS = {"asyncio": "floor_asyncio", "uvloop": "floor_uvloop"}  # event loop → floor target
CHAT_PATH = "/v1/chat/completions"
CHAT_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}]}'
STREAM_BODY = (
    b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello."}]}'
)
STEADY_USER = "bench-steady"  # long-lived tokens: every billed call but the storms'
STORM_USER = "bench-storm"  # tokens that go stale FRESH_WINDOW_S after each refresh
# Connected anew before each of its storms with a token already inside the wait skew; its
# refreshes bring STEADY_TTL_S tokens, so calls after the refresh find nothing to refresh.
WAIT_STORM_USER = "bench-storm-wait"
STEADY_TTL_S = 3600.0
# The sidecar's defaults, set explicitly so the storms' timing holds.
REFRESH_SKEW_S = 30.0
REFRESH_WAIT_SKEW_S = 5.0
FRESH_WINDOW_S = 1.0
# A real token endpoint answers in tens of milliseconds; the storm's waiters wait that long.
REFRESH_DELAY_MS = 50.0
REDIS_PROBE_TIMEOUT_S = 1.0


def chat_headers(user: str = STEADY_USER) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Quota-User": user}


def stream_headers(user: str = STEADY_USER, **extra: str) -> dict[str, str]:
    # The header lets the nginx front pick the stub's streamed answer (it cannot read bodies).
    return {**chat_headers(user), "X-Bench-Stream": "1", **extra}


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    pids: tuple[int, ...]  # the processes that do this target's work (pinned for "one core")
    sidecar: SidecarTarget | None = None


@dataclass
class Rig:
    children: Children
    workdir: Path
    stub: Child
    stub_port: int
    quota_port: int  # where the sidecars and the nginx reference find Quota
    front: Child | None = None
    targets: dict[str, Target] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    redis_url: str | None = None
    key_prefix: str = ""
    session_secret: str = ""
    connected_at: dict[str, float] = field(default_factory=dict)  # sidecar → users connected
    idle_rss: dict[str, int] = field(default_factory=dict)  # sidecar → RSS once started

    @property
    def support_pids(self) -> tuple[int, ...]:
        """The stub's processes: they serve every target, and are not what is measured."""
        return (self.stub.pid,) + ((self.front.pid,) if self.front is not None else ())

    @property
    def quota_url(self) -> str:
        return f"http://127.0.0.1:{self.quota_port}"

    def stub_counts(self) -> dict[str, int]:
        counts: dict[str, int] = json.loads(self._stub_call("GET", "/_bench/stats"))
        return counts

    def reset_stub_counts(self) -> None:
        self._stub_call("POST", "/_bench/reset")

    def _stub_call(self, method: str, path: str) -> bytes:
        client = Client(self.stub_port, timeout_s=5)
        try:
            answer = client.exchange(build_request(method, path, port=self.stub_port))
        finally:
            client.close()
        return answer.body


def has_uvloop() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def find_redis() -> tuple[str | None, str]:
    """``REDIS_URL`` if set, else a Redis on 127.0.0.1:6379 if one answers; else why not."""
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    client = redis.Redis.from_url(
        url, socket_connect_timeout=REDIS_PROBE_TIMEOUT_S, socket_timeout=REDIS_PROBE_TIMEOUT_S
    )
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        where = "REDIS_URL" if os.environ.get("REDIS_URL") else "127.0.0.1:6379"
        return None, f"no Redis answered at {where} ({type(exc).__name__})"
    finally:
        client.close()
    return url, ""


def start_rig(
    children: Children,
    workdir: Path,
    *,
    nginx_binary: str | None,
    sidecar_log_level: str,
    skip: frozenset[str] = frozenset(),
    sidecar_loop: str = "asyncio",
) -> Rig:
    """Start everything; a target named in ``skip`` is left out, with that as its reason."""
    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    stub_port = free_port()
    stub = children.start(
        "stub",
        [
            sys.executable,
            str(STUB_SCRIPT),
            "--port",
            str(stub_port),
            "--refresh-delay-ms",
            str(REFRESH_DELAY_MS),
        ],
        env=base_env,
        cwd=workdir,
    )
    wait_listening(stub, stub_port, START_TIMEOUT_S)
    rig = Rig(children, workdir, stub, stub_port, quota_port=stub_port)
    rig.targets["direct"] = Target("direct", stub_port, (stub.pid,))

    if "nginx" in skip:
        rig.skipped["nginx"] = "left out on request (--skip nginx)"
    elif nginx_binary is None:
        rig.skipped["nginx"] = "nginx is not installed (the full run installs it when root)"
    else:
        front_port, proxy_port = free_port(), free_port()
        prefix = workdir / "nginx-front"
        conf = nginx.write_conf(
            prefix,
            nginx.front_conf(
                prefix,
                listen_port=front_port,
                stub_port=stub_port,
                chat_json=CHAT_JSON,
                workers="auto",
            ),
        )
        rig.front = children.start(
            "nginx-front", nginx.command(nginx_binary, prefix, conf), env=base_env, cwd=workdir
        )
        wait_listening(rig.front, front_port, START_TIMEOUT_S)
        rig.quota_port = front_port
        rig.targets["direct"] = Target("direct", front_port, (rig.front.pid,))
        prefix = workdir / "nginx-proxy"
        conf = nginx.write_conf(
            prefix,
            nginx.proxy_conf(
                prefix, listen_port=proxy_port, upstream_port=front_port, workers="auto"
            ),
        )
        proxy = children.start(
            "nginx-proxy", nginx.command(nginx_binary, prefix, conf), env=base_env, cwd=workdir
        )
        wait_listening(proxy, proxy_port, START_TIMEOUT_S)
        rig.targets["nginx"] = Target("nginx", proxy_port, (proxy.pid,))

    for loop, name in FLOORS.items():
        if "floor" in skip:
            rig.skipped[name] = "left out on request (--skip floor)"
        elif loop == "uvloop" and not has_uvloop():
            rig.skipped[name] = "uvloop is not installed"
        else:
            port = free_port()
            floor = children.start(
                name,
                [
                    sys.executable,
                    str(FLOOR_SCRIPT),
                    "--port",
                    str(port),
                    "--upstream",
                    rig.quota_url,
                    "--loop",
                    loop,
                ],
                env=base_env,
                cwd=workdir,
            )
            wait_listening(floor, port, START_TIMEOUT_S)
            rig.targets[name] = Target(name, port, (floor.pid,))

    rig.session_secret = new_session_secret()
    rig.key_prefix = f"quota-sidecar-bench-{secrets.token_hex(4)}"
    rig.redis_url, why_not = (None, "left out on request (--skip sidecar_redis)")
    if "sidecar_redis" not in skip:
        rig.redis_url, why_not = find_redis()
    stores = {"sidecar": "memory"}
    if rig.redis_url is None:
        rig.skipped["sidecar_redis"] = why_not
    else:
        stores["sidecar_redis"] = rig.redis_url
    users = {STEADY_USER: STEADY_TTL_S, STORM_USER: REFRESH_SKEW_S + FRESH_WINDOW_S}
    sidecar_env = {
        **base_env,
        "QUOTA_SIDECAR__TOKENS__REFRESH_SKEW_S": str(REFRESH_SKEW_S),
        "QUOTA_SIDECAR__TOKENS__REFRESH_WAIT_SKEW_S": str(REFRESH_WAIT_SKEW_S),
    }
    for name, store in stores.items():
        sidecar = start_sidecar(
            children,
            name,
            quota_url=rig.quota_url,
            upstream_url=f"http://127.0.0.1:{stub_port}",
            session_secret=rig.session_secret,
            store=store,
            key_prefix=rig.key_prefix,
            log_level=sidecar_log_level,
            cwd=workdir,
            base_env=sidecar_env,
            loop=sidecar_loop,
        )
        asyncio.run(connect_users(sidecar, users))
        rig.connected_at[name] = time.monotonic()
        rig.targets[name] = Target(name, sidecar.internal_port, (sidecar.pid,), sidecar)

    # The Redis sidecar again with ``--workers auto``: one worker per CPU, as an operator would
    # run it on a machine of its own. Its pid is the supervisor's; what is measured counts the
    # workers under it.
    if "sidecar_workers" in skip:
        rig.skipped["sidecar_workers"] = "left out on request (--skip sidecar_workers)"
    elif rig.redis_url is None:
        rig.skipped["sidecar_workers"] = f"needs the Redis store: {why_not}"
    else:
        sidecar = start_sidecar(
            children,
            "sidecar_workers",
            quota_url=rig.quota_url,
            upstream_url=f"http://127.0.0.1:{stub_port}",
            session_secret=rig.session_secret,
            store=rig.redis_url,
            key_prefix=f"{rig.key_prefix}-workers",
            log_level=sidecar_log_level,
            cwd=workdir,
            base_env=sidecar_env,
            loop=sidecar_loop,
            workers="auto",
        )
        asyncio.run(connect_users(sidecar, {STEADY_USER: STEADY_TTL_S}))
        rig.targets["sidecar_workers"] = Target(
            "sidecar_workers", sidecar.internal_port, (sidecar.pid,), sidecar
        )
    return rig


def delete_bench_keys(redis_url: str, prefix: str) -> int:
    """Remove every key this run wrote (under its own prefix); never anything else."""
    client = redis.Redis.from_url(url=redis_url, socket_timeout=5, socket_connect_timeout=2)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(client.delete(*batch))
                batch.clear()
        if batch:
            deleted += int(client.delete(*batch))
    finally:
        client.close()
    return deleted
