"""The bench's child processes: start, wait until they listen, pin to CPUs, read RSS, stop by PID.

Every child is started here and recorded in a ``Children`` group; the run stops each one by its
own PID (SIGTERM, then SIGKILL after a bounded wait) whatever happens, so nothing outlives the
bench. Output goes to a log file per child (a full pipe would block it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

STOP_TIMEOUT_S = 10.0
KILL_TIMEOUT_S = 5.0


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: int = signal.SIGTERM

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(self.stop_signal)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait(timeout=KILL_TIMEOUT_S)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Children:
    """Every process the bench started, stopped in reverse order of starting."""

    log_dir: Path
    started: list[Child] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        stop_signal: int = signal.SIGTERM,
    ) -> Child:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(  # noqa: S603 - argv is built by the bench, no shell
                list(argv),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        child = Child(name, process, log_path, stop_signal)
        self.started.append(child)
        return child

    def stop_all(self) -> None:
        while self.started:
            self.started.pop().stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(child: Child, port: int, timeout_s: float) -> None:
    """Return once ``127.0.0.1:port`` accepts a connection; fail if the child died or time ran out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited early:\n{child.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{child.name} did not listen within {timeout_s} s:\n{child.log_tail()}"
            )
        time.sleep(0.05)


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (``VmRSS`` in ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time used so far by ``pids`` and all their descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        for process in (pid, *descendants(pid)):
            try:
                stat = Path(f"/proc/{process}/stat").read_text()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / ticks


def descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren and so on (nginx's workers under its master)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        for task in _tasks(current):
            try:
                text = Path(f"/proc/{current}/task/{task}/children").read_text()
            except OSError:
                continue
            for child in text.split():
                found.append(int(child))
                pending.append(int(child))
    return found


def _tasks(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def set_affinity(pids: Iterable[int], cpu_set: Iterable[int]) -> None:
    """Pin every thread of every process in ``pids`` (and their descendants) to ``cpu_set``."""
    wanted = set(cpu_set)
    for pid in pids:
        for process in (pid, *descendants(pid)):
            for task in _tasks(process):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(task, wanted)


@contextlib.contextmanager
def pinned(layout: Mapping[int, Iterable[int]]) -> Iterator[None]:
    """Pin each process (PID → CPUs) for the block, then let every one use all CPUs again."""
    everything = cpus()
    try:
        for pid, cpu_set in layout.items():
            set_affinity([pid], cpu_set)
        yield
    finally:
        set_affinity(layout, everything)


def raise_fd_limit(wanted: int = 16384) -> int:
    """Raise this process's open-file limit (children inherit it); return the limit in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft
