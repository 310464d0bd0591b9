"""``run --workers N``: several worker processes serving the same ports, and their supervisor.

One Python process uses one core. With ``--workers N`` the process started becomes a supervisor
that serves nothing itself::

    supervisor (the process started)              worker 0 … N-1 (forked, an event loop each)
    ─ checks every address is free, holds it      ─ binds the same addresses with SO_REUSEPORT,
      with a bound, never-listening placeholder     serves every listener exactly as a single
      (so port 0 resolves once, for all)            process does, writes "ready" on its pipe
    ─ forks the workers, reads their pipes        ─ the kernel spreads new connections over the
    ─ SIGTERM / SIGINT → SIGTERM to every worker:   workers' listening sockets
      each drains as a single process does        ─ SIGINT is ignored (a terminal's Ctrl-C
      (readyz 503, drain delay, grace), then        reaches the whole process group; the
      the supervisor exits when all have            supervisor turns it into one SIGTERM)
    ─ a second signal: every worker exits now     ─ dies with its supervisor (PR_SET_PDEATHSIG)

A worker that exits before it is ready (a port taken, a broken install) stops them all: the
supervisor exits with its code, as a single process would. A worker that dies after it was
ready is replaced, after a back-off that grows while replacements keep dying.

Workers share what must be shared through the token store (Redis): tokens, the refresh lease,
change notices, guards, webhook replay marks. So ``cli.run`` refuses several workers with the
memory store. Their metrics are summed through prometheus_client's multiprocess files
(``sidecar.worker_metrics``); the supervisor writes the live workers' pids beside them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import math
import os
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from sidecar.config import Config
from sidecar.config_loader import split_host_port
from sidecar.worker_metrics import DIRECTORY_ENV, WORKERS_FILE

log = logging.getLogger(__name__)

# Back-off before replacing a worker that died: doubles per death in a row, up to the cap.
RESTART_DELAY_S = 0.5
RESTART_DELAY_MAX_S = 30.0
# A worker that stayed up this long has its death count forgotten.
STABLE_AFTER_S = 60.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ListenError(Exception):
    """An address a worker was to listen on is taken or cannot be bound."""


@dataclass
class _Worker:
    index: int
    pid: int
    ready_fd: int | None
    started: float
    ready: bool = False


@dataclass
class WorkerContext:
    """What a worker is told about itself: passed to ``serve`` in the child."""

    index: int
    metrics_dir: Path
    # Call once the listeners are up; the supervisor counts the worker as ready from then.
    report_ready: Callable[[], None]


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_count(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota if one is set
    (a Kubernetes CPU limit of 2 on a 64-core node means 2; a limit of 1.5 means 2)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max``, else v1 ``cfs_quota_us``), or ``None``."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def parse_workers(value: str) -> int:
    """``--workers`` / ``QUOTA_SIDECAR_WORKERS``: a count from 1, or ``auto`` (``cpu_count()``)."""
    text = value.strip().lower()
    if text == "auto":
        return cpu_count()
    if not text.isdigit() or not 1 <= int(text) <= 256:
        raise ValueError(
            f"QUOTA_SIDECAR_WORKERS / --workers: must be a number from 1 to 256 or 'auto', "
            f"got {value!r}"
        )
    return int(text)


def _addresses(config: Config) -> dict[str, str]:
    listen = config.listen
    found = {"public": listen.public, "internal": listen.internal}
    if listen.admin_address is not None:
        found["admin"] = listen.admin_address
    return found


def _socket_for(family: int, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def hold_addresses(config: Config) -> tuple[Config, list[socket.socket]]:
    """Check every listener's address is free and hold it; port 0 becomes a real port.

    For each address, a plain bind first (it fails if anything holds the port, a listener with
    SO_REUSEPORT included — without this, a second sidecar on the same port would silently
    share its traffic), then a bound placeholder with SO_REUSEPORT that the workers join. The
    placeholder never listens, so it is never handed a connection. Raises ``ListenError``.
    """
    held: list[socket.socket] = []
    resolved: dict[str, str] = {}
    try:
        for name, address in _addresses(config).items():
            host, port = split_host_port(address)
            try:
                infos = socket.getaddrinfo(
                    host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
            except socket.gaierror as exc:
                raise ListenError(f"listen.{name}: cannot resolve {host!r}: {exc}") from None
            for family, _, _, _, sockaddr in dict.fromkeys(infos):  # once each, in order
                at = (sockaddr[0], port, *sockaddr[2:])
                try:
                    probe = _socket_for(family, reuse_port=False)
                    with probe:
                        probe.bind(at)
                        port = probe.getsockname()[1]  # port 0: the same one for every family
                    placeholder = _socket_for(family, reuse_port=True)
                    held.append(placeholder)
                    placeholder.bind((sockaddr[0], port, *sockaddr[2:]))
                except OSError as exc:
                    why = "address already in use" if exc.errno == errno.EADDRINUSE else exc
                    raise ListenError(f"listen.{name}: cannot listen on {address}: {why}") from None
            resolved[name] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    except BaseException:
        for sock in held:
            sock.close()
        raise
    listen = replace(
        config.listen,
        public=resolved["public"],
        internal=resolved["internal"],
        admin=resolved.get("admin", config.listen.admin),
    )
    return replace(config, listen=listen), held


@contextlib.contextmanager
def metrics_directory(env: Mapping[str, str]) -> Iterator[Path]:
    """``PROMETHEUS_MULTIPROC_DIR`` if set (emptied of an earlier run's files), else a private
    temporary directory removed at exit."""
    given = env.get(DIRECTORY_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in [*path.glob("*.db"), path / WORKERS_FILE]:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="quota-sidecar-metrics-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Supervisor:
    """Forks ``count`` workers that each run ``serve(config, context)`` and watches them."""

    config: Config
    count: int
    serve: Callable[[Config, WorkerContext], int]
    metrics_dir: Path
    workers: dict[int, _Worker] = field(default_factory=dict)
    restarts: int = 0
    _deaths: dict[int, int] = field(default_factory=dict)  # index → deaths in a row
    _due: dict[int, float] = field(default_factory=dict)  # index → when to fork it again
    _stopping: bool = False
    _exit_code: int = 0
    _all_ready_logged: bool = False

    def run(self, held: list[socket.socket]) -> int:
        """Serve until every worker has exited after a signal, or one failed to start."""
        self._selector = selectors.DefaultSelector()
        self._held = held
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._wake = (wake_r, wake_w)
        self._selector.register(wake_r, selectors.EVENT_READ)
        previous = {
            sig: signal.signal(sig, _note_signal)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
        }
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        try:
            for index in range(self.count):
                self._fork(index)
            self._write_workers_file()
            while self.workers or (not self._stopping and self._due):
                self._turn()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for worker in self.workers.values():  # only if the loop itself failed
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
            self._selector.close()
            os.close(wake_r)
            os.close(wake_w)
        log.info("all workers exited")
        return self._exit_code

    def _turn(self) -> None:
        timeout = None
        if self._due and not self._stopping:
            timeout = max(0.0, min(self._due.values()) - time.monotonic())
        for key, _ in self._selector.select(timeout):
            fd = int(key.fd)
            if fd == self._wake[0]:
                self._on_signals(_drain(fd))
            else:
                self._on_ready_pipe(fd)
        self._reap()
        now = time.monotonic()
        for index, when in list(self._due.items()):
            if when <= now and not self._stopping:
                del self._due[index]
                self._fork(index)
                self.restarts += 1
                self._write_workers_file()

    def _fork(self, index: int) -> None:
        ready_r, ready_w = os.pipe()
        sys.stdout.flush()  # or the child would write the parent's buffered lines again
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(ready_r)
            self._become_worker(index, ready_w)  # never returns
        os.close(ready_w)
        os.set_blocking(ready_r, False)
        self._selector.register(ready_r, selectors.EVENT_READ)
        self.workers[pid] = _Worker(index, pid, ready_r, time.monotonic())
        log.info("worker %d started (pid %d)", index, pid)

    def _become_worker(self, index: int, ready_w: int) -> None:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _die_with_parent(os.getppid())
            for fd in (*self._wake, *(w.ready_fd for w in self.workers.values() if w.ready_fd)):
                with contextlib.suppress(OSError):
                    os.close(fd)
            for sock in self._held:
                sock.close()
            self._selector.close()

            def report_ready() -> None:
                with contextlib.suppress(OSError):
                    os.write(ready_w, b"r")

            code = self.serve(self.config, WorkerContext(index, self.metrics_dir, report_ready))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _on_ready_pipe(self, fd: int) -> None:
        worker = next((w for w in self.workers.values() if w.ready_fd == fd), None)
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return
        if worker is not None and data:
            worker.ready = True
            ready = sum(w.ready for w in self.workers.values())
            if not self._all_ready_logged and ready == self.count:
                self._all_ready_logged = True
                log.info("%d workers ready", self.count)
            return
        self._close_ready(fd, worker)  # end of file: the worker is exiting

    def _close_ready(self, fd: int, worker: _Worker | None) -> None:
        self._selector.unregister(fd)
        os.close(fd)
        if worker is not None:
            worker.ready_fd = None

    def _on_signals(self, signums: list[int]) -> None:
        for signum in signums:
            if signum not in (signal.SIGTERM, signal.SIGINT):
                continue  # SIGCHLD: _reap runs after every turn
            if not self._stopping:
                log.info("stopping: %s to every worker", signal.Signals(signal.SIGTERM).name)
                self._stop(0)
            else:
                # A second signal: each worker exits at once on its second SIGTERM.
                log.info("second signal: every worker exits now")
                self._exit_code = 128 + signum
                self._signal_all(signal.SIGTERM)

    def _stop(self, code: int) -> None:
        self._stopping = True
        self._exit_code = self._exit_code or code
        self._due.clear()
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    def _reap(self) -> None:
        from prometheus_client import multiprocess

        changed = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            changed = True
            if worker.ready_fd is not None:
                self._close_ready(worker.ready_fd, worker)
            multiprocess.mark_process_dead(pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
            code = os.waitstatus_to_exitcode(status)
            how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
            if self._stopping:
                log.info("worker %d (pid %d) exited: %s", worker.index, pid, how)
                if code > 0 and self._exit_code == 0:
                    self._exit_code = code
            elif not worker.ready:
                log.error("worker %d failed to start (%s); stopping", worker.index, how)
                self._stop(code if code > 0 else 1)
            else:
                self._schedule_restart(worker, how)
        if changed:
            self._write_workers_file()

    def _schedule_restart(self, worker: _Worker, how: str) -> None:
        now = time.monotonic()
        if now - worker.started >= STABLE_AFTER_S:
            self._deaths[worker.index] = 0
        deaths = self._deaths.get(worker.index, 0)
        delay = min(RESTART_DELAY_MAX_S, RESTART_DELAY_S * 2**deaths)
        self._deaths[worker.index] = deaths + 1
        self._due[worker.index] = now + delay
        log.error(
            "worker %d (pid %d) died (%s); replacing it in %g s",
            worker.index,
            worker.pid,
            how,
            delay,
        )

    def _write_workers_file(self) -> None:
        """Live workers by index, for /metrics (``sidecar.worker_metrics``); replaced atomically."""
        doc = {
            "supervisor": os.getpid(),
            "workers": {str(w.index): w.pid for w in self.workers.values()},
            "restarts": self.restarts,
        }
        target = self.metrics_dir / WORKERS_FILE
        partial = target.with_suffix(".tmp")
        partial.write_text(json.dumps(doc))
        partial.replace(target)


def _note_signal(signum: int, frame: object) -> None:
    """Installed so the C-level handler writes the signal to the wake-up pipe; work is done in
    the supervisor's loop, not here."""


def _drain(fd: int) -> list[int]:
    received: list[int] = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 512):
            received.extend(chunk)
    return received


def _die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM to this worker when the supervisor dies (Linux); elsewhere
    an orphaned worker serves on until it is stopped."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the supervisor died before the call above
        os.kill(os.getpid(), signal.SIGTERM)
