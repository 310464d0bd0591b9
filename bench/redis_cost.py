"""What the Redis store costs: commands per billed call and per refresh, bytes per connected user.

Commands are counted two ways around a run of billed calls. ``INFO commandstats`` deltas are
server-wide: on a shared Redis (``REDIS_URL``, or the one on 127.0.0.1:6379 other suites use)
they include everyone's commands, and they count the commands a Lua script runs as if each were
sent. So the round-trips are also counted exactly: ``MONITOR`` lists every command with the
client port it came from, and only those from the sidecar's own Redis connections (found through
``/proc/<pid>/fd`` and ``/proc/net/tcp``) are kept; commands run inside a script show as
``lua`` and ride on their ``EVALSHA``.

Memory: records sealed and written exactly as the sidecar writes them (its own store class and
keys, under this run's prefix), then measured two ways: ``MEMORY USAGE`` of sampled keys (per
key, exact) and the growth of ``used_memory`` (whole server; noisy on a shared one). Two token
shapes: opaque tokens as long as Quota's, and JWT-sized ones, to show the slope.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from bench.http1 import Client, build_request
from bench.rig import (
    CHAT_BODY,
    CHAT_PATH,
    FRESH_WINDOW_S,
    STORM_USER,
    Rig,
    chat_headers,
    delete_bench_keys,
)

WARMUP_CALLS = 20
STALE_MARGIN_S = 0.3
WRITE_BATCH = 200
SAMPLED_KEYS = 50
TOKEN_SHAPES = {
    # quota_token_ + 24 random bytes, base64url: the emulator's (and Quota's) opaque tokens
    "opaque": 32,
    # a signed JWT is commonly 600-1000 characters
    "jwt_sized": 900,
}


def _command_counts(client: redis.Redis) -> Counter[str]:
    stats = client.info("commandstats")
    return Counter(
        {
            name.removeprefix("cmdstat_"): int(value["calls"])
            for name, value in stats.items()
            if isinstance(value, dict) and "calls" in value
        }
    )


def _delta(after: Counter[str], before: Counter[str]) -> Counter[str]:
    delta = Counter({k: after[k] - before.get(k, 0) for k in after})
    delta.pop("info", None)  # our own INFO calls
    return +delta


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def redis_client_ports(pid: int, redis_port: int) -> set[str]:
    """Local ports of ``pid``'s TCP connections to ``redis_port`` (its Redis clients)."""
    inodes = _socket_inodes(pid)
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == redis_port:
                ports.add(str(int(local.rsplit(":", 1)[1], 16)))
    return ports


class CommandLog:
    """``MONITOR`` in a thread: every command the server runs, with the client port it came from."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=0.25, socket_connect_timeout=2)
        self._stop = threading.Event()
        self.seen: list[tuple[str, str]] = []  # (client port or "lua", command name)
        self._thread = threading.Thread(target=self._run, name="redis-monitor", daemon=True)
        self._ready = threading.Event()

    def __enter__(self) -> CommandLog:
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("MONITOR did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._client.close()

    def _run(self) -> None:
        with self._client.monitor() as monitor:  # type: ignore[no-untyped-call]
            self._ready.set()
            while not self._stop.is_set():
                try:
                    entry = monitor.next_command()
                except (redis.TimeoutError, TimeoutError):
                    continue
                except (redis.RedisError, OSError):
                    return
                if entry:
                    port = "lua" if entry["client_type"] == "lua" else entry["client_port"]
                    name = entry["command"].split(" ", 1)[0].strip('"').lower()
                    self.seen.append((port, name))

    def from_ports(self, ports: set[str]) -> Counter[str]:
        return Counter(name for port, name in self.seen if port in ports)


def round_trips(rig: Rig, *, calls: int) -> dict[str, Any]:
    """Redis round-trips per billed call in steady state, and for one call that refreshes."""
    if "sidecar_redis" not in rig.targets or rig.redis_url is None:
        return {"skipped": rig.skipped.get("sidecar_redis", "no Redis variant")}
    target = rig.targets["sidecar_redis"]
    pid, port = target.pids[0], target.port
    redis_port = urlsplit(rig.redis_url).port or 6379
    steady = build_request("POST", CHAT_PATH, port=port, headers=chat_headers(), body=CHAT_BODY)
    storm = build_request(
        "POST", CHAT_PATH, port=port, headers=chat_headers(STORM_USER), body=CHAT_BODY
    )
    stats = redis.Redis.from_url(rig.redis_url, socket_timeout=5, socket_connect_timeout=2)
    http = Client(port)
    try:
        for _ in range(WARMUP_CALLS):
            http.exchange(steady)
        with CommandLog(rig.redis_url) as log:
            before = _command_counts(stats)
            failures = sum(1 for _ in range(calls) if http.exchange(steady).status != 200)
            server_wide = _delta(_command_counts(stats), before)
        steady_commands = log.from_ports(redis_client_ports(pid, redis_port))

        time.sleep(FRESH_WINDOW_S + STALE_MARGIN_S)  # the storm user's token is stale again
        with CommandLog(rig.redis_url) as log:
            refreshing_status = http.exchange(storm).status
            time.sleep(0.2)  # the lock's release and PUBLISH follow the answer
        refresh_commands = log.from_ports(redis_client_ports(pid, redis_port))
    finally:
        http.close()
        stats.close()
    return {
        "calls": calls,
        "failures": failures,
        "commands_from_the_sidecar": dict(steady_commands),
        "round_trips_per_call": round(sum(steady_commands.values()) / calls, 3),
        "commandstats_delta_server_wide": dict(server_wide),
        "refreshing_call_status": refreshing_status,
        "round_trips_for_a_refreshing_call": sum(refresh_commands.values()),
        "commands_for_a_refreshing_call": dict(refresh_commands),
        "note": "round-trips from MONITOR, the sidecar's connections only; commandstats are "
        "server-wide (other clients, and commands run inside Lua scripts, included)",
    }


def _fake_token(prefix: str, length: int) -> str:
    return prefix + secrets.token_urlsafe(length)[:length]


async def _seed(rig: Rig, prefix: str, users: int, token_chars: int) -> list[str]:
    """Write ``users`` records as the sidecar would; return their Redis keys."""
    from sidecar.config_loader import build_config
    from sidecar.services import USER_KEY_LABEL, make_sealer
    from sidecar.tokens.crypto import UserKeys, derive_key
    from sidecar.tokens.factory import create_store
    from sidecar.tokens.model import TokenRecord
    from sidecar.tokens.redis_store import RedisTokenStore

    assert rig.redis_url is not None
    config = build_config(
        {
            "quota": {"client_id": "bench", "client_secret": "bench"},
            "session": {"secret": rig.session_secret},
        },
        env={},
    )
    store = create_store(rig.redis_url, make_sealer(config), prefix=prefix)
    assert isinstance(store, RedisTokenStore)
    user_keys = UserKeys(derive_key(rig.session_secret.encode(), USER_KEY_LABEL))
    now = time.time()
    keys: list[str] = []
    try:
        for start in range(0, users, WRITE_BATCH):
            batch = [
                user_keys.key_for(f"user-{i}")
                for i in range(start, min(users, start + WRITE_BATCH))
            ]
            await asyncio.gather(
                *(
                    store.put(
                        key,
                        TokenRecord(
                            access_token=_fake_token("quota_token_", token_chars),
                            refresh_token=_fake_token("quota_refresh_", token_chars),
                            expires_at=now + 3600,
                            scope="credits.read credits.spend",
                            obtained_at=now,
                        ),
                    )
                    for key in batch
                )
            )
            keys += [store.tokens_key(key) for key in batch]
        # The two short-lived keys a refresh adds: the lock and the spent token's grace mark.
        first = user_keys.key_for("user-0")
        await store.remember_rotation(first, "quota_refresh_spent", 60)
        await store.client.set(store.lock_key(first), f"host:1:{secrets.token_hex(8)}", px=60_000)
        keys += [store.rotated_key(first, "quota_refresh_spent"), store.lock_key(first)]
    finally:
        await store.close()
    return keys


def memory_per_user(rig: Rig, *, users: int) -> dict[str, Any]:
    if rig.redis_url is None:
        return {"skipped": rig.skipped.get("sidecar_redis", "no Redis")}
    r = redis.Redis.from_url(rig.redis_url, socket_timeout=10, socket_connect_timeout=2)
    shapes: dict[str, Any] = {}
    try:
        for shape, token_chars in TOKEN_SHAPES.items():
            prefix = f"{rig.key_prefix}-mem-{shape}"
            used_before = int(r.info("memory")["used_memory"])
            keys = asyncio.run(_seed(rig, prefix, users, token_chars))
            used_after = int(r.info("memory")["used_memory"])
            token_keys, extra_keys = keys[:-2], keys[-2:]
            step = max(1, len(token_keys) // SAMPLED_KEYS)
            sampled = [int(r.memory_usage(k, samples=0) or 0) for k in token_keys[::step]]
            blob = r.hget(token_keys[0], "b") or b""
            shapes[shape] = {
                "users": users,
                "token_chars": token_chars + len("quota_refresh_"),
                "sealed_blob_bytes": len(blob),
                "memory_usage_per_user_bytes": round(sum(sampled) / len(sampled)),
                "used_memory_growth_per_user_bytes": round((used_after - used_before) / users),
                "grace_mark_bytes": int(r.memory_usage(extra_keys[0], samples=0) or 0),
                "lock_bytes": int(r.memory_usage(extra_keys[1], samples=0) or 0),
            }
            delete_bench_keys(rig.redis_url, prefix)
    finally:
        r.close()
    return {"by_token_shape": shapes}
