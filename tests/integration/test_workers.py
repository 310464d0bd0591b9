"""``quota-sidecar run --workers N`` as a real process tree: ports shared, metrics summed, workers
replaced, signals passed on, one refresh per expiry across workers, the memory store refused.

The emulator and a stub host app run in the test's loop; the sidecar is a child process with the
Redis store on free loopback ports. Its access log (JSON) names the worker of every line, which is
how a test sees that the kernel spread connections over every worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.mock_quota import MockQuota, create_app
from tests.integration.conftest import free_port
from tests.integration.test_graceful_shutdown import Running, open_stream, status_of, wait_until
from tests.support import Browser, approve_consent, create_stub_upstream

WORKERS = 2
BILLED = 'quota_sidecar_requests_total{listener="internal",route="v1",status="200"}'
START_TIMEOUT_S = 30.0
DRAIN_S = 0.3
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


class Tree(Running):
    """The supervisor's process (``proc``) and the log of the whole tree."""

    def lines(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                found.append(json.loads(line))
        return found

    def worker_pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False
        )
        return [int(pid) for pid in out.stdout.split()]


async def metric(admin_url: str, name: str) -> float | None:
    """One sample of ``/metrics`` (new connection each time, so any worker may answer)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.get(f"{admin_url}/metrics") as resp,
    ):
        text = await resp.text()
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return None


def sidecar_env(
    quota_url: str, upstream_url: str, client: Any, redis_url: str, prefix: str, ports: list[int]
) -> dict[str, str]:
    public, internal, admin = ports
    return {
        "PATH": os.environ.get("PATH", ""),
        "QUOTA_CLIENT_ID": client.client_id,
        "QUOTA_CLIENT_SECRET": client.client_secret,
        "QUOTA_BASE_URL": quota_url,
        "SESSION_SECRET": "workers-test-session-secret-of-32-chars",
        "REDIS_URL": redis_url,
        "QUOTA_SIDECAR__TOKENS__KEY_PREFIX": prefix,
        "QUOTA_SIDECAR__LISTEN__PUBLIC": f"127.0.0.1:{public}",
        "QUOTA_SIDECAR__LISTEN__INTERNAL": f"127.0.0.1:{internal}",
        "QUOTA_SIDECAR__LISTEN__ADMIN": f"127.0.0.1:{admin}",
        "QUOTA_SIDECAR__UPSTREAM__URL": upstream_url,
        "QUOTA_SIDECAR__SHUTDOWN__DRAIN_DELAY_S": str(DRAIN_S),
        "QUOTA_SIDECAR__SHUTDOWN__GRACE_S": "10",
    }


@pytest.fixture
async def tree(
    aiohttp_server: Callable[..., Any], tmp_path: Path, redis_url: str, redis_prefix: str
) -> AsyncIterator[Tree]:
    quota = MockQuota()
    quota_url = str((await aiohttp_server(create_app(quota))).make_url("")).rstrip("/")
    upstream = create_stub_upstream()
    upstream_url = str((await aiohttp_server(upstream.app)).make_url("")).rstrip("/")
    ports = [free_port(), free_port(), free_port()]
    client = quota.register_client(
        name="Workers test", redirect_uris=[f"http://127.0.0.1:{ports[0]}/auth/quota/callback"]
    )
    env = sidecar_env(quota_url, upstream_url, client, redis_url, redis_prefix, ports)
    log_path = tmp_path / "sidecar.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--workers", str(WORKERS)],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal would give it
        )
    public, internal, admin = (f"http://127.0.0.1:{port}" for port in ports)
    running = Tree(proc, quota, public, internal, admin, log_path)
    try:

        async def ready() -> bool:
            assert proc.poll() is None, running.log()
            return "workers ready" in log_path.read_text(errors="replace")

        await wait_until(ready, within_s=START_TIMEOUT_S, what="every worker started")
        yield running
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


async def connect(tree: Tree, user: str) -> None:
    browser = Browser()
    try:
        browser.sign_in(tree.public_url, user)
        consent = await browser.get(f"{tree.public_url}/auth/quota/connect")
        assert consent.status == 200, await consent.text()
        landed = await approve_consent(browser, consent, f"{user}@example.com")
        await landed.read()
        assert landed.status == 200, tree.log()
    finally:
        await browser.close()


async def billed_calls(tree: Tree, user: str, count: int) -> list[int]:
    """``count`` billed calls, each on a new connection (so the kernel picks a worker each time)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one() -> int:
            async with http.post(
                f"{tree.internal_url}/v1/chat/completions",
                json=CHAT,
                headers={"X-Quota-User": user},
            ) as resp:
                await resp.read()
                return resp.status

        return list(await asyncio.gather(*(one() for _ in range(count))))


def workers_of_billed_calls(tree: Tree) -> Counter[int]:
    return Counter(
        line["worker"]
        for line in tree.lines()
        if line.get("logger") == "sidecar.access" and line.get("path") == "/v1/chat/completions"
    )


async def test_every_worker_serves_the_same_ports_with_one_users_tokens(tree: Tree) -> None:
    await connect(tree, "alice")  # through whichever worker the browser reached
    statuses = await billed_calls(tree, "alice", 60)
    assert statuses == [200] * 60, tree.log()

    async def logged() -> bool:  # access lines are flushed once per loop turn
        return sum(workers_of_billed_calls(tree).values()) == 60

    await wait_until(logged, within_s=5, what="every call's access line")
    served = workers_of_billed_calls(tree)
    assert sorted(served) == list(range(WORKERS)), served
    assert tree.quota.counters["chat.completions"] == 60


async def test_metrics_sum_every_worker_whichever_answers_the_scrape(tree: Tree) -> None:
    await connect(tree, "alice")
    await billed_calls(tree, "alice", 40)

    async def copied() -> bool:  # each worker copies its figures at least once a second
        return await metric(tree.admin_url, BILLED) == 40.0

    await wait_until(copied, within_s=5, what="every worker's calls in the scrape")
    seen = {await metric(tree.admin_url, BILLED) for _ in range(8)}
    assert seen == {40.0}, seen
    assert await metric(tree.admin_url, "quota_sidecar_workers") == WORKERS
    text = await _metrics_text(tree.admin_url)
    for index in range(WORKERS):
        assert f'process_resident_memory_bytes{{worker="{index}"}}' in text
    assert 'process_resident_memory_bytes{worker="supervisor"}' in text


async def _metrics_text(admin_url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{admin_url}/metrics") as resp:
        return await resp.text()


async def test_a_worker_that_dies_is_replaced_and_its_counts_are_kept(tree: Tree) -> None:
    await connect(tree, "alice")
    await billed_calls(tree, "alice", 20)

    async def copied() -> bool:  # what a killed worker counted after its last copy is lost
        return await metric(tree.admin_url, BILLED) == 20.0

    await wait_until(copied, within_s=5, what="every worker's calls copied")
    before = tree.worker_pids()
    assert len(before) == WORKERS
    os.kill(before[0], signal.SIGKILL)

    async def replaced() -> bool:
        pids = tree.worker_pids()
        return len(pids) == WORKERS and before[0] not in pids

    await wait_until(replaced, within_s=10, what="the dead worker replaced")

    async def all_up() -> bool:
        return await metric(tree.admin_url, "quota_sidecar_worker_restarts_total") == 1.0

    await wait_until(all_up, within_s=10, what="the restart counted")
    # The dead worker's calls still count: counters never go backwards.
    assert await metric(tree.admin_url, BILLED) == 20.0
    assert await billed_calls(tree, "alice", 20) == [200] * 20

    async def all_counted() -> bool:
        return await metric(tree.admin_url, BILLED) == 40.0

    await wait_until(all_counted, within_s=5, what="the new calls counted with the old")
    assert "died (signal SIGKILL); replacing it" in tree.log_path.read_text()


async def test_sigterm_drains_every_worker_lets_a_stream_finish_and_exits_0(tree: Tree) -> None:
    await connect(tree, "alice")
    tree.quota.settings.chunk_delay_s = 0.1
    async with aiohttp.ClientSession() as http:
        _, events = await open_stream(http, tree)
        tree.proc.send_signal(signal.SIGTERM)

        async def not_ready() -> bool:
            return await status_of(f"{tree.admin_url}/readyz") == 503

        await wait_until(not_ready, within_s=DRAIN_S + 1, what="not ready after SIGTERM")
        rest = [event async for event in events]
        assert rest[-1] == "data: [DONE]"
    assert tree.proc.wait(timeout=20) == 0, tree.log()
    assert tree.log().count("listeners closed") == WORKERS
    assert tree.quota.counters["chat.stream_aborted"] == 0


async def test_ctrl_c_to_the_process_group_is_one_graceful_stop(tree: Tree) -> None:
    # A terminal's Ctrl-C reaches every process of the group at once; the workers ignore it
    # and the supervisor passes one SIGTERM on, so this is a graceful stop, not "second signal".
    os.killpg(tree.proc.pid, signal.SIGINT)
    assert tree.proc.wait(timeout=20) == 0, tree.log()
    assert tree.log().count("listeners closed") == WORKERS
    assert "second signal" not in tree.log()


async def test_a_second_signal_makes_every_worker_exit_at_once(tree: Tree) -> None:
    await connect(tree, "alice")
    tree.quota.settings.chunk_delay_s = 5.0  # a stream that would outlast any patience
    async with aiohttp.ClientSession() as http:
        resp, _ = await open_stream(http, tree)
        tree.proc.send_signal(signal.SIGTERM)

        async def not_ready() -> bool:
            return await status_of(f"{tree.admin_url}/readyz") == 503

        await wait_until(not_ready, within_s=DRAIN_S + 1, what="not ready after SIGTERM")
        tree.proc.send_signal(signal.SIGTERM)
        assert tree.proc.wait(timeout=5) == 128 + signal.SIGTERM, tree.log()
        resp.close()


async def test_workers_exit_when_their_supervisor_is_killed(tree: Tree) -> None:
    pids = tree.worker_pids()
    assert len(pids) == WORKERS
    tree.proc.kill()  # SIGKILL: the supervisor cannot pass anything on
    tree.proc.wait(timeout=5)

    async def gone() -> bool:
        return not any(_alive(pid) for pid in pids)

    await wait_until(gone, within_s=10, what="the orphaned workers exited")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_one_refresh_per_expiry_across_workers(tree: Tree) -> None:
    tree.quota.settings.access_token_ttl_s = 31  # inside the 30 s window almost at once
    await connect(tree, "alice")
    tree.quota.settings.access_token_ttl_s = 3600
    await asyncio.sleep(1.2)
    statuses = await billed_calls(tree, "alice", 80)
    assert statuses == [200] * 80, tree.log()
    assert tree.quota.counters["token.refresh_ok"] == 1, tree.quota.counters

    async def both_served() -> bool:
        return sorted(workers_of_billed_calls(tree)) == list(range(WORKERS))

    await wait_until(both_served, within_s=5, what="calls served by every worker")


# --- refused before any worker starts -------------------------------------------------------


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "run", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _base_env(ports: list[int], **extra: str) -> dict[str, str]:
    public, internal, admin = ports
    return {
        "PATH": os.environ.get("PATH", ""),
        "QUOTA_CLIENT_ID": "quota_client_test",
        "QUOTA_CLIENT_SECRET": "quota_secret_test",
        "SESSION_SECRET": "workers-test-session-secret-of-32-chars",
        "QUOTA_SIDECAR__LISTEN__PUBLIC": f"127.0.0.1:{public}",
        "QUOTA_SIDECAR__LISTEN__INTERNAL": f"127.0.0.1:{internal}",
        "QUOTA_SIDECAR__LISTEN__ADMIN": f"127.0.0.1:{admin}",
        **extra,
    }


def test_several_workers_with_the_memory_store_are_refused(tmp_path: Path) -> None:
    done = _run(["--workers", "2"], _base_env([free_port(), free_port(), free_port()]), tmp_path)
    assert done.returncode == 1
    assert "--workers 2 needs a shared token store" in done.stderr
    assert "REDIS_URL" in done.stderr


@pytest.mark.parametrize("value", ["0", "-1", "two", "1000"])
def test_a_bad_worker_count_is_refused_naming_the_setting(tmp_path: Path, value: str) -> None:
    env = _base_env([free_port(), free_port(), free_port()], QUOTA_SIDECAR_WORKERS=value)
    done = _run([], env, tmp_path)
    assert done.returncode == 1
    assert "QUOTA_SIDECAR_WORKERS / --workers: must be a number from 1 to 256 or 'auto'" in (
        done.stderr
    )


@pytest.mark.parametrize("holder_reuses_port", [False, True], ids=["plain", "so_reuseport"])
def test_a_port_already_taken_is_refused_before_any_worker_starts(
    tmp_path: Path, redis_url: str, holder_reuses_port: bool
) -> None:
    # A listener holding the port with SO_REUSEPORT (another sidecar, say) would otherwise be
    # joined silently, and the two would split each other's traffic.
    ports = [free_port(), free_port(), free_port()]
    holder = socket.socket()
    if holder_reuses_port:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    with holder:
        holder.bind(("127.0.0.1", ports[1]))
        holder.listen()
        done = _run(["--workers", "2"], _base_env(ports, REDIS_URL=redis_url), tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"listen.internal: cannot listen on 127.0.0.1:{ports[1]}: address already in use" in (
        done.stderr
    )
    assert "worker 0 started" not in done.stdout


def test_port_0_is_one_port_for_every_worker(tmp_path: Path, redis_url: str) -> None:
    env = _base_env([0, 0, 0], REDIS_URL=redis_url)
    env["QUOTA_SIDECAR__LISTEN__ADMIN"] = "off"
    log_path = tmp_path / "sidecar.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--workers", "2"],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "workers ready" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line[:1] == "{"]
        public = {line["msg"] for line in lines if line["msg"].startswith("public listener on")}
        assert len(public) == 1, public  # both workers on the same, resolved port
        assert not public.pop().endswith(":0")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log_path.read_text()
