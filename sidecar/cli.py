"""The ``quota-sidecar`` command: run, check-config, rotate-keys, demo, mock-quota, init, doctor,
gen-secret, version."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import yaml

from sidecar import __version__
from sidecar.config import Config
from sidecar.config_loader import ConfigError, load_config, masked, resolve_path

if TYPE_CHECKING:
    from sidecar.workers import WorkerContext

COMMANDS = (
    "run",
    "check-config",
    "rotate-keys",
    "demo",
    "mock-quota",
    "init",
    "doctor",
    "gen-secret",
    "version",
)


def _add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="YAML config file (default: $QUOTA_SIDECAR_CONFIG, else config/sidecar.yaml if present)",
    )


# The commands whose options their own modules add. Those modules bring the emulator, the demo
# app, init and doctor with them (about 1.2 MB that ``run`` never uses), so each is imported only
# when its command is the one on the command line.
_OWN_ARGUMENTS = {
    "demo": "sidecar.demo.runner",
    "mock-quota": "sidecar.mock_quota.cli",
    "init": "sidecar.setup.init_cmd",
    "doctor": "sidecar.doctor.command",
    "gen-secret": "sidecar.setup.gen_secret",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; with ``command``, only that subcommand gets its own options.

    Every subcommand is listed either way, so ``--help`` reads the same; ``main`` passes the
    command it finds in ``argv``, and parsing that command needs no other subcommand's options.
    """
    parser = argparse.ArgumentParser(
        prog="quota-sidecar",
        description="Let any web app bill its users' AI calls to their own Quota wallet.",
    )
    parser.add_argument("--version", action="version", version=f"quota-sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="serve the public and internal listeners (the default)")
    _add_config_arg(run)
    run.add_argument(
        "--loop",
        choices=LOOPS,
        default=None,
        help="event loop: uvloop when installed (pip install 'quota-sidecar[fast]'; the image "
        "has it), else asyncio (default auto; env QUOTA_SIDECAR_LOOP)",
    )
    run.add_argument(
        "--workers",
        metavar="N",
        default=None,
        help="worker processes sharing the ports (SO_REUSEPORT), one per core: a number or "
        "'auto' (the CPUs this container may use); more than 1 needs a Redis token store "
        "(default 1; env QUOTA_SIDECAR_WORKERS)",
    )
    check = sub.add_parser(
        "check-config", help="validate the config and print it with secrets masked"
    )
    _add_config_arg(check)
    rotate = sub.add_parser(
        "rotate-keys",
        help="re-seal stored tokens under the first of tokens.encryption_keys (Redis stores)",
    )
    _add_config_arg(rotate)
    rotate.add_argument(
        "--dry-run", action="store_true", help="count what would be re-sealed; change nothing"
    )
    demo = sub.add_parser(
        "demo", help="Quota emulator + demo app + sidecar on http://localhost:5180, one command"
    )
    mock = sub.add_parser("mock-quota", help="run the Quota emulator alone, for local development")
    init = sub.add_parser(
        "init",
        help="sign in to Quota, register the app, write config/sidecar.yaml, .env and a k8s Secret",
    )
    doctor = sub.add_parser(
        "doctor", help="check the config, Quota, the app's identity probe, the store and the clock"
    )
    _add_config_arg(doctor)
    gen_secret = sub.add_parser(
        "gen-secret",
        help="print a fresh 32-byte URL-safe secret (SESSION_SECRET, tokens.encryption_keys)",
    )
    own = {
        "demo": demo,
        "mock-quota": mock,
        "init": init,
        "doctor": doctor,
        "gen-secret": gen_secret,
    }
    for name, subparser in own.items():
        if command is None or command == name:
            importlib.import_module(_OWN_ARGUMENTS[name]).add_arguments(subparser)
    sub.add_parser("version", help="print the version, with Python's, aiohttp's and redis-py's")
    return parser


def version() -> int:
    """The sidecar's version first (alone on its line, for scripts), then what it runs on."""
    import platform

    import aiohttp
    import redis

    print(f"quota-sidecar {__version__}")
    print(f"Python {platform.python_version()} ({platform.python_implementation()})")
    print(f"aiohttp {aiohttp.__version__}")
    print(f"redis-py {redis.__version__}")
    return 0


def _load(path: str | None) -> Config:
    return load_config(resolve_path(path, os.environ))


def check_config(args: argparse.Namespace) -> int:
    try:
        config = _load(args.config)
    except ConfigError as exc:
        print(f"quota-sidecar: {exc}", file=sys.stderr)
        return 1
    print(yaml.safe_dump(masked(config), sort_keys=False), end="")
    print("configuration OK", file=sys.stderr)
    return 0


LOOPS = ("auto", "asyncio", "uvloop")


def loop_factory(choice: str) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """The event loop ``run`` uses: ``(name, factory)``; ``None`` is asyncio's own.

    uvloop serves the same requests with less CPU; ``auto`` takes it when it is installed.
    Raises ``ValueError`` for an unknown choice or a uvloop that is asked for and missing.
    """
    if choice not in LOOPS:
        raise ValueError(f"QUOTA_SIDECAR_LOOP: must be one of {', '.join(LOOPS)}, got {choice!r}")
    if choice == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError(
                "uvloop is not installed: pip install 'quota-sidecar[fast]', or use --loop asyncio"
            ) from None
        return "asyncio", None
    return "uvloop", uvloop.new_event_loop


def worker_count(choice: str, config: Config) -> int:
    """How many processes ``run`` serves with; ``ValueError`` for a bad count, or for several
    with the memory store (each worker would hold its own users' tokens)."""
    from sidecar.workers import parse_workers

    count = parse_workers(choice)
    if count > 1 and config.tokens.store == "memory":
        raise ValueError(
            f"--workers {count} needs a shared token store, but tokens.store is 'memory': its "
            "tokens live inside one process, so each worker would know only the users who "
            "connected through it. Set REDIS_URL (tokens.store) to a Redis URL, or run one worker"
        )
    return count


def run(args: argparse.Namespace) -> int:
    try:
        config = _load(getattr(args, "config", None))
        loop_name, factory = loop_factory(
            getattr(args, "loop", None) or os.environ.get("QUOTA_SIDECAR_LOOP", "auto")
        )
        workers = worker_count(
            getattr(args, "workers", None) or os.environ.get("QUOTA_SIDECAR_WORKERS", "1"), config
        )
    except (ConfigError, ValueError) as exc:
        print(f"quota-sidecar: {exc}", file=sys.stderr)
        return 1
    from sidecar import log

    log.configure(config.log.level, config.log.format)
    logging.getLogger(__name__).info("event loop: %s", loop_name)
    if workers > 1:
        return _supervise(config, workers, factory)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_serve(config))


def _supervise(
    config: Config, workers: int, factory: Callable[[], asyncio.AbstractEventLoop] | None
) -> int:
    """``run --workers N``: hold the ports, fork the workers, watch them (``sidecar.workers``)."""
    from sidecar.workers import (
        ListenError,
        Supervisor,
        hold_addresses,
        metrics_directory,
    )

    try:
        resolved, held = hold_addresses(config)
    except ListenError as exc:
        print(f"quota-sidecar: {exc}", file=sys.stderr)
        return 1

    def serve(worker_config: Config, worker: WorkerContext) -> int:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(_serve(worker_config, worker=worker))

    logging.getLogger(__name__).info("%d workers on the same ports (SO_REUSEPORT)", workers)
    try:
        with metrics_directory(os.environ) as directory:
            return Supervisor(resolved, workers, serve, directory).run(held)
    finally:
        for sock in held:
            sock.close()


def rotate_keys(args: argparse.Namespace) -> int:
    """Exit 0 when done, 1 on a config problem or an unreachable store, 2 for a memory store."""
    try:
        config = _load(args.config)
    except ConfigError as exc:
        print(f"quota-sidecar: {exc}", file=sys.stderr)
        return 1
    if config.tokens.store == "memory":
        print(
            "quota-sidecar: rotate-keys works on a shared store (Redis), but tokens.store is "
            "'memory': those records live inside each running sidecar process, where this "
            "command cannot reach them (they are re-sealed under the first key as they refresh, "
            "and lost on restart anyway)",
            file=sys.stderr,
        )
        return 2
    from sidecar import log

    log.configure(config.log.level, config.log.format)
    return asyncio.run(_rotate_keys(config, dry_run=args.dry_run))


async def _rotate_keys(config: Config, *, dry_run: bool) -> int:
    from sidecar.errors import StoreUnavailable
    from sidecar.services import make_sealer
    from sidecar.tokens.factory import create_store
    from sidecar.tokens.rotate import rotate_keys as rotate

    sealer = make_sealer(config)
    try:
        store = create_store(config.tokens.store, sealer, prefix=config.tokens.key_prefix)
    except ValueError as exc:  # the message never repeats the URL (it may hold a password)
        print(f"quota-sidecar: {exc}", file=sys.stderr)
        return 1
    try:
        report = await rotate(store, dry_run=dry_run)
    except StoreUnavailable as exc:
        detail = exc.detail or exc.message
        print(f"quota-sidecar: the token store is unavailable: {detail}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(StoreUnavailable):
            await store.close()
    print(f"primary key {sealer.primary_key_id}: {report.summary()}")
    return 0


async def _serve(config: Config, *, worker: WorkerContext | None = None) -> int:
    """Serve until SIGTERM (or SIGINT); ``worker`` when this is one of ``--workers N``."""
    from sidecar.app import Sidecar
    from sidecar.metrics import Metrics
    from sidecar.services import open_services

    metrics = mirror = None
    if worker is not None:
        from sidecar.log import label_worker
        from sidecar.worker_metrics import FileMirror, exposition_registry

        label_worker(worker.index)
        metrics = Metrics(process=False)
        mirror = FileMirror(metrics.instruments(), worker.metrics_dir, os.getpid())
        metrics.exposition = exposition_registry(mirror, worker.metrics_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        # The first SIGTERM/SIGINT shuts down gracefully; a second one exits at once, with
        # 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as a shell reports it.
        if stop.is_set():
            print("quota-sidecar: second signal, exiting now", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(128 + signum)
        stop.set()

    # A worker leaves SIGINT ignored: a terminal's Ctrl-C reaches the whole process group, and
    # the supervisor passes it on as one SIGTERM.
    signals = (signal.SIGTERM,) if worker is not None else (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal, sig)
    copying = asyncio.create_task(mirror.run()) if mirror is not None else None
    try:
        async with open_services(config, metrics=metrics) as services:
            sidecar = Sidecar(services)
            try:
                await sidecar.start(reuse_port=worker is not None)
            except OSError as exc:
                print(f"quota-sidecar: cannot listen: {exc.strerror or exc}", file=sys.stderr)
                await sidecar.stop()
                return 1
            if worker is not None:
                worker.report_ready()
            await stop.wait()
            await sidecar.shutdown()
        return 0
    finally:
        if copying is not None and mirror is not None:
            copying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await copying
            mirror.close()  # the last figures, the shutdown's included


def _command_in(argv: Sequence[str]) -> str:
    """The subcommand named on the command line (``run`` if none): its first word without a
    dash, since the top-level options (``--help``, ``--version``) take no value."""
    return next((arg for arg in argv if not arg.startswith("-")), "run")


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser(_command_in(argv)).parse_args(argv)
    command = args.command or "run"
    if command == "check-config":
        return check_config(args)
    if command == "rotate-keys":
        return rotate_keys(args)
    if command == "demo":
        from sidecar.demo.runner import main as demo_main

        return demo_main(args)
    if command == "init":
        from sidecar.setup.init_cmd import main as init_main

        return init_main(args)
    if command == "doctor":
        from sidecar.doctor.command import main as doctor_main

        return doctor_main(args)
    if command == "gen-secret":
        from sidecar.setup.gen_secret import main as gen_secret_main

        return gen_secret_main(args)
    if command == "version":
        return version()
    if command == "mock-quota":
        from sidecar.mock_quota.cli import main as mock_main

        return mock_main(args)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
