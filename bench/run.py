"""Run the benchmark suite: ``python bench/run.py`` (a few minutes) or ``--smoke`` (seconds).

Starts the stub, nginx (front and reference) and two sidecars (memory and Redis stores), runs
every scenario against each target in one go, prints a table and the verdicts against the
targets, and writes ``bench/results/latest.json`` plus a dated copy (``--smoke``:
``bench/results/smoke.json`` only, never over the recorded results). Everything it starts is
stopped by PID at the end, and the whole run is bounded in time.

Without the package importable, it uses (and if need be creates) the project's ``.venv``. A full
run as root installs Debian's ``nginx-light`` and ``wrk`` when they are missing (``--no-install``
to prevent it); ``--smoke`` never installs: missing tools leave their columns null, with the
reason, and the asyncio load generator stands in for wrk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
BOOTSTRAP_MARK = "QUOTA_BENCH_BOOTSTRAPPED"
INSTALL_TIMEOUT_S = 900


def _bootstrap() -> None:
    """Re-run under the project's ``.venv`` (made on first use) unless the package imports here."""
    try:
        import aiohttp  # noqa: F401
        import redis  # noqa: F401

        import sidecar  # noqa: F401
    except ImportError:
        pass
    else:
        return
    if os.environ.get(BOOTSTRAP_MARK):
        raise SystemExit("bench: the quota-sidecar package does not import even in .venv")
    if not VENV_PYTHON.exists():
        print("bench: creating .venv and installing the package (once)", flush=True)
        subprocess.run(  # noqa: S603 - fixed arguments, no shell
            [sys.executable, "-m", "venv", str(ROOT / ".venv")],
            check=True,
            timeout=INSTALL_TIMEOUT_S,
        )
        subprocess.run(  # noqa: S603 - fixed arguments, no shell
            [str(VENV_PYTHON), "-m", "pip", "install", "--quiet", "-e", str(ROOT)],
            check=True,
            timeout=INSTALL_TIMEOUT_S,
        )
    env = {**os.environ, BOOTSTRAP_MARK: "1"}
    os.execve(VENV_PYTHON, [str(VENV_PYTHON), __file__, *sys.argv[1:]], env)  # noqa: S606


def _install_tools(wanted: list[str]) -> str:
    """apt-get the Debian packages for ``wanted`` tools; say what happened."""
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        return "not root or no apt-get: not installed"
    packages = ["nginx-light" if tool == "nginx" else tool for tool in wanted]
    print(f"bench: installing {' '.join(packages)} with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in ([apt, "update"], [apt, "install", "-y", "--no-install-recommends", *packages]):
        done = subprocess.run(  # noqa: S603 - fixed arguments, no shell
            argv,
            env=env,
            timeout=INSTALL_TIMEOUT_S,
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return "installed" if done.returncode == 0 else f"apt-get failed ({done.returncode})"


def _machine(
    nginx_binary: str | None, wrk_binary: str | None, redis_url: str | None
) -> dict[str, Any]:
    import platform

    import aiohttp
    import redis

    import sidecar
    from bench import load, nginx

    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    redis_version = None
    if redis_url is not None:
        client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            redis_version = client.info("server").get("redis_version")
        finally:
            client.close()
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "redis_py": redis.__version__,
        "quota_sidecar": sidecar.__version__,
        "nginx": nginx.version(nginx_binary) if nginx_binary else None,
        "wrk": load.wrk_version(wrk_binary) if wrk_binary else None,
        "redis_server": redis_version,
    }


class RunTimeout(Exception):
    """The whole run went past its time bound."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise RunTimeout("the bench ran past its time bound")


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts, a few seconds")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="where the JSON goes"
    )
    parser.add_argument(
        "--no-install", action="store_true", help="never apt-get nginx or wrk (full run)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also sample the sidecar under load with py-spy (full run)",
    )
    parser.add_argument(
        "--label",
        help="write only <date>-<label>.json (an experiment), leaving latest.json as it is",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("nginx", "floor", "sidecar_redis", "sidecar_workers"),
        help="leave a target out (its columns are null, with this as the reason); repeatable",
    )
    parser.add_argument(
        "--sidecar-loop",
        default="auto",
        choices=("auto", "asyncio", "uvloop"),
        help="the sidecars' event loop; auto, as shipped: uvloop when installed",
    )
    parser.add_argument(
        "--sidecar-log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="the sidecars' log level (info, as shipped, writes one access-log line per call)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    _bootstrap()
    sys.path.insert(0, str(ROOT))
    from bench import latency, load, memory, nginx, profile, redis_cost, report, sse, storm
    from bench.plan import FULL, SMOKE
    from bench.procs import Children, raise_fd_limit
    from bench.rig import FLOORS, Rig, delete_bench_keys, find_redis, has_uvloop, start_rig

    args = parse_args(argv)
    if args.sidecar_loop == "auto":
        args.sidecar_loop = "uvloop" if has_uvloop() else "asyncio"
    plan = SMOKE if args.smoke else FULL
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    notes: list[str] = []

    found = {"nginx": nginx.binary(), "wrk": load.wrk_binary()}
    missing = [tool for tool, path in found.items() if path is None]
    if missing and not args.smoke and not args.no_install:
        notes.append(f"{', '.join(missing)} missing at start: {_install_tools(missing)}")
    nginx_binary = nginx.binary()
    wrk_binary = load.wrk_binary()
    if not plan.use_wrk:
        notes.append("load generator: asyncio (smoke mode never uses wrk)")
    elif wrk_binary is None:
        notes.append("wrk is not installed: the asyncio load generator was used")
    fd_limit = raise_fd_limit()

    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGTERM, _on_term)
    signal.alarm(plan.max_run_s)
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    rig: Rig | None = None
    machine: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="quota-bench-") as tmp:
        workdir = Path(tmp)
        children = Children(workdir)

        def scenario(name: str, run: Callable[[], Any]) -> None:
            began = time.monotonic()
            print(f"bench: {name} …", flush=True)
            try:
                results[name] = run()
            except (RunTimeout, KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
                results[name] = {"error": errors[name]}
                traceback.print_exc()
            results.setdefault("_timings_s", {})[name] = round(time.monotonic() - began, 1)

        try:
            redis_url = None if "sidecar_redis" in args.skip else find_redis()[0]
            machine = _machine(nginx_binary, wrk_binary, redis_url)
            rig = start_rig(
                children,
                workdir,
                nginx_binary=nginx_binary,
                sidecar_log_level=args.sidecar_log_level,
                skip=frozenset(args.skip),
                sidecar_loop=args.sidecar_loop,
            )
            memory.record_idle(rig, settle_s=plan.settle_s)
            runner = latency.LoadRunner(rig, use_wrk=plan.use_wrk, workdir=workdir)
            # First, while no load has grown the heaps: what the crowds themselves cost.
            scenario(
                "memory",
                lambda: memory.measure(rig, count=plan.open_connections, settle_s=plan.settle_s),
            )
            scenario(
                "latency_sequential",
                lambda: latency.sequential(
                    rig, requests=plan.sequential_requests, warmup=plan.sequential_warmup
                ),
            )
            scenario(
                "latency_sequential_paused",
                lambda: latency.sequential(
                    rig, requests=plan.paused_requests, warmup=0, pause_s=plan.pause_s, block=10
                ),
            )
            scenario(
                "sse",
                lambda: sse.measure(
                    rig,
                    paced_streams=plan.sse_paced_streams,
                    burst_streams=plan.sse_burst_streams,
                    cpu_streams=plan.sse_cpu_streams,
                ),
            )
            scenario(
                "latency_concurrent",
                lambda: latency.concurrent(runner, levels=(16, 64), duration_s=plan.load_s),
            )
            scenario(
                "throughput_one_core",
                lambda: latency.one_core(runner, concurrency=64, duration_s=plan.load_s),
            )
            floor = FLOORS[args.sidecar_loop]
            results["throughput"] = latency.throughput_summary(
                results.get("latency_concurrent", {}).get("c64", {}),
                results.get("throughput_one_core", {}),
                runner.tool,
                floor=floor if floor in rig.targets else None,
            )
            scenario(
                "refresh_storm",
                lambda: storm.measure(rig, size=plan.storm_size, rounds=plan.storm_rounds),
            )
            scenario(
                "redis_round_trips", lambda: redis_cost.round_trips(rig, calls=plan.redis_calls)
            )
            scenario(
                "redis_memory", lambda: redis_cost.memory_per_user(rig, users=plan.redis_users)
            )
            scenario("memory_store", lambda: memory.store_per_user(rig, users=plan.redis_users))
            if args.profile and plan.profile_s:
                scenario(
                    "profile",
                    lambda: profile.record(runner, duration_s=plan.profile_s, out_dir=args.out),
                )
        except RunTimeout as exc:
            errors["run"] = str(exc)
        except Exception as exc:
            traceback.print_exc()
            for child in children.started:
                print(f"--- {child.name} log (tail)\n{child.log_tail()}", file=sys.stderr)
            errors["setup"] = f"{type(exc).__name__}: {exc}"
        finally:
            signal.alarm(0)
            children.stop_all()
            if rig is not None and rig.redis_url is not None:
                delete_bench_keys(rig.redis_url, rig.key_prefix)

    results = {
        "schema": 1,
        "mode": plan.mode,
        "started_at": stamp,
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine,
        "plan": asdict(plan),
        "setup": {
            "targets": list(rig.targets) if rig else [],
            "skipped": rig.skipped if rig else {},
            "stub": (
                "nginx front (return 200 for the plain JSON answer) + aiohttp stub (SSE, OAuth)"
                if rig is not None and rig.front is not None
                else "aiohttp stub for everything (nginx not installed)"
            ),
            "sidecar_log_level": args.sidecar_log_level,
            "sidecar_loop": args.sidecar_loop,
            "key_prefix": rig.key_prefix if rig else None,
            "open_file_limit": fd_limit,
            "notes": notes,
        },
        **results,
        "errors": errors,
    }
    results["verdicts"] = report.verdicts(results)
    results["setup"]["label"] = args.label
    written = report.write(results, args.out, smoke=args.smoke, stamp=stamp, label=args.label)
    print()
    print(report.render_table(results))
    print()
    print(report.render_verdicts(results["verdicts"]))
    for note in notes:
        print(f"note: {note}")
    for name, reason in results["setup"]["skipped"].items():
        print(f"skipped {name}: {reason}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
