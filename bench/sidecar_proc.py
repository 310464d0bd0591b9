"""A real ``python -m sidecar run`` under test, and its users connected through the OAuth flow.

The sidecar runs as it ships (JSON access log at ``info`` included), configured only through
``QUOTA_SIDECAR__*`` variables, with a fresh environment (no ``REDIS_URL`` leaks into the memory
variant) and a working directory without ``config/sidecar.yaml``. Every listener is on loopback.

Users are connected the way a browser does it, so whichever store the sidecar uses (its own
memory, or Redis) holds the tokens exactly as in production::

    GET  public/auth/quota/connect      (cookie bench_user=<id>: the stub's identity probe)
      → 302 stub/oauth/authorize?…      (+ the bench's ttl_s: the grant's token lifetime)
      → 302 public/auth/quota/callback?code&state
      → sidecar exchanges the code at stub/oauth/token, stores the tokens, 302 /
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from bench.procs import Child, Children, free_port, wait_listening

START_TIMEOUT_S = 30.0
SEED_TIMEOUT_S = 30.0
CLIENT_ID = "quota_client_bench"
CLIENT_SECRET = "quota_secret_bench"  # noqa: S105 - the stub accepts any secret
# Outgoing connections to Quota: the default (512) would queue the 513th open stream.
POOL_SIZE = 4096


@dataclass
class SidecarTarget:
    name: str
    child: Child
    public_port: int
    internal_port: int
    admin_port: int
    store: str  # "memory" or the Redis URL (never printed: it may hold a password)
    key_prefix: str

    @property
    def pid(self) -> int:
        return self.child.pid


def start_sidecar(
    children: Children,
    name: str,
    *,
    quota_url: str,
    upstream_url: str,
    session_secret: str,
    store: str,
    key_prefix: str,
    log_level: str,
    cwd: Path,
    base_env: Mapping[str, str],
    loop: str = "asyncio",
    workers: str = "1",
) -> SidecarTarget:
    public, internal, admin = free_port(), free_port(), free_port()
    env = {
        **base_env,
        "QUOTA_BASE_URL": quota_url,
        "QUOTA_CLIENT_ID": CLIENT_ID,
        "QUOTA_CLIENT_SECRET": CLIENT_SECRET,
        "SESSION_SECRET": session_secret,
        "QUOTA_SIDECAR__LISTEN__PUBLIC": f"127.0.0.1:{public}",
        "QUOTA_SIDECAR__LISTEN__INTERNAL": f"127.0.0.1:{internal}",
        "QUOTA_SIDECAR__LISTEN__ADMIN": f"127.0.0.1:{admin}",
        "QUOTA_SIDECAR__UPSTREAM__URL": upstream_url,
        "QUOTA_SIDECAR__TOKENS__KEY_PREFIX": key_prefix,
        "QUOTA_SIDECAR__LIMITS__POOL_SIZE": str(POOL_SIZE),
        "QUOTA_SIDECAR__LOG__LEVEL": log_level,
        "QUOTA_SIDECAR__SHUTDOWN__DRAIN_DELAY_S": "0",
        "QUOTA_SIDECAR__SHUTDOWN__GRACE_S": "1",
    }
    if store != "memory":
        env["REDIS_URL"] = store
    # Named, not left to ``auto``: the floor it is compared with runs on the same loop.
    env["QUOTA_SIDECAR_LOOP"] = loop
    argv = [sys.executable, "-m", "sidecar", "run", "--workers", workers]
    child = children.start(name, argv, env=env, cwd=cwd)
    wait_listening(child, internal, START_TIMEOUT_S)
    if workers != "1":
        _wait_for_every_worker(child)
    return SidecarTarget(name, child, public, internal, admin, store, key_prefix)


def _wait_for_every_worker(child: Child) -> None:
    """The supervisor logs "<n> workers ready" once each worker listens."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while "workers ready" not in child.log_path.read_text(errors="replace"):
        if not child.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{child.name}: not every worker started:\n{child.log_tail()}")
        time.sleep(0.05)


async def connect_user(
    target: SidecarTarget, user: str, *, ttl_s: float, refresh_ttl_s: float | None = None
) -> None:
    """Connect ``user``'s wallet through the browser flow; their tokens live ``ttl_s`` seconds,
    and those their refreshes bring ``refresh_ttl_s`` (default: ``ttl_s`` too)."""
    public = f"http://127.0.0.1:{target.public_port}"
    jar = aiohttp.CookieJar(unsafe=True)
    jar.update_cookies({"bench_user": user}, URL(public))
    timeout = aiohttp.ClientTimeout(total=SEED_TIMEOUT_S)
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=timeout) as http:
        async with http.get(f"{public}/auth/quota/connect", allow_redirects=False) as resp:
            if resp.status != 302:
                raise RuntimeError(f"connect answered {resp.status}: {await resp.text()}")
            authorize = resp.headers["Location"]
        lifetimes = {
            "ttl_s": ttl_s,
            "refresh_ttl_s": ttl_s if refresh_ttl_s is None else refresh_ttl_s,
        }
        async with http.get(f"{authorize}&{urlencode(lifetimes)}", allow_redirects=False) as resp:
            callback = resp.headers["Location"]
        async with http.get(callback, allow_redirects=False) as resp:
            landed = resp.headers.get("Location", "")
            if resp.status != 302 or "quota_error" in landed:
                raise RuntimeError(f"callback answered {resp.status} → {landed}")
        status_url = f"http://127.0.0.1:{target.internal_port}/auth/quota/status"
        async with http.get(status_url, headers={"X-Quota-User": user}) as resp:
            body = await resp.json()
            if not body.get("connected"):
                raise RuntimeError(f"{user} is not connected after the flow: {body}")


async def connect_users(target: SidecarTarget, users: Mapping[str, float]) -> None:
    """Connect each user (id → token lifetime in seconds)."""
    async with asyncio.timeout(SEED_TIMEOUT_S):
        for user, ttl_s in users.items():
            await connect_user(target, user, ttl_s=ttl_s)


def new_session_secret() -> str:
    return secrets.token_urlsafe(32)
