"""Sidecar replicas as real OS processes sharing one Redis, for the cross-replica tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.integration.conftest import free_port

START_TIMEOUT_S = 30.0


@dataclass
class Replica:
    """One ``quota-sidecar run`` process; its output goes to a file (a full pipe would block it)."""

    env: dict[str, str]
    log_path: Path
    public_url: str = ""
    internal_url: str = ""
    admin_url: str = ""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def configure(cls, base_env: Mapping[str, str], log_dir: Path, index: int) -> Replica:
        public, internal, admin = free_port(), free_port(), free_port()
        env = {
            "PATH": os.environ.get("PATH", ""),
            **base_env,
            "QUOTA_SIDECAR__LISTEN__PUBLIC": f"127.0.0.1:{public}",
            "QUOTA_SIDECAR__LISTEN__INTERNAL": f"127.0.0.1:{internal}",
            "QUOTA_SIDECAR__LISTEN__ADMIN": f"127.0.0.1:{admin}",
            # Nothing routes to these replicas: no load balancer to wait for at shutdown.
            "QUOTA_SIDECAR__SHUTDOWN__DRAIN_DELAY_S": "0",
        }
        return cls(
            env=env,
            log_path=log_dir / f"replica-{index}.log",
            public_url=f"http://127.0.0.1:{public}",
            internal_url=f"http://127.0.0.1:{internal}",
            admin_url=f"http://127.0.0.1:{admin}",
        )

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "run"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.log_path.parent,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        async with aiohttp.ClientSession() as http:
            while True:
                assert self.process is not None
                assert self.process.poll() is None, self.log()
                try:
                    async with http.get(f"{self.internal_url}/auth/quota/status") as resp:
                        if resp.status == 400:  # up, and asking for an identity
                            return
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, f"replica did not start:\n{self.log()}"
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no lock release, as when a node dies."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    async def terminate(self, timeout_s: float = 15.0) -> int:
        """SIGTERM, then wait for the exit without blocking the loop (the emulator runs in it)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while (code := self.process.poll()) is None:
            assert time.monotonic() < deadline, f"replica did not stop:\n{self.log()}"
            await asyncio.sleep(0.05)
        return code

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""
