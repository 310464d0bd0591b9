"""``quota-sidecar demo``: the Quota emulator, a demo host app and the sidecar, in one command.

    browser ──► sidecar public  http://localhost:5180  ──► demo app  127.0.0.1:5182
                      demo app ──► sidecar internal  127.0.0.1:5183 ──► emulator 127.0.0.1:5181

The emulator registers an OAuth client whose redirect URI is the recipe's dev callback,
``http://localhost:5180/auth/quota/callback``; the sidecar uses the in-memory store. Everything
binds to loopback and stops on Ctrl-C.

The wallet features are wired end to end, each with a secret made fresh per run: the emulator
sends its webhooks (signed with a ``whsec_`` secret) to the sidecar's ``/auth/quota/webhook``,
and the sidecar passes them on, signed with the events secret, to the demo app's
``/quota/events``, which the page lists. Top-ups go through the emulator's checkout page.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from sidecar.app import Sidecar
from sidecar.config import Config
from sidecar.config_loader import build_config
from sidecar.demo.hostapp import create_host_app
from sidecar.mock_quota import MockQuota
from sidecar.mock_quota.cli import start_mock_quota
from sidecar.services import open_services


@dataclass
class Demo:
    url: str  # open this in a browser
    quota_url: str
    app_url: str
    internal_url: str
    quota: MockQuota
    config: Config
    webhook_secret: str  # the emulator signs its webhooks with it; the sidecar checks them
    events_secret: str  # the sidecar signs events for the app with it; the app checks them


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=5180, help="the browser's port (default 5180)")
    parser.add_argument("--quota-port", type=int, default=5181, help="emulator port (default 5181)")
    parser.add_argument("--app-port", type=int, default=5182, help="demo app port (default 5182)")
    parser.add_argument(
        "--internal-port", type=int, default=5183, help="internal listener port (default 5183)"
    )
    parser.add_argument(
        "--access-token-ttl",
        type=float,
        default=3600,
        metavar="SECONDS",
        help="lifetime of the emulator's access tokens; make it short to watch refreshes",
    )
    parser.add_argument(
        "--balance", type=int, default=5_000_000, help="starting wallet balance in credits ($5)"
    )


@contextlib.asynccontextmanager
async def running_demo(
    *,
    port: int = 5180,
    quota_port: int = 5181,
    app_port: int = 5182,
    internal_port: int = 5183,
    access_token_ttl_s: float = 3600,
    balance: int = 5_000_000,
    host: str = "localhost",
    config_overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> AsyncIterator[Demo]:
    """Start all three parts; ports may be 0 (free ports, as the tests use).

    ``config_overrides`` are merged into the sidecar's config sections, key by key
    (e.g. ``{"session": {"trusted_proxies": ["127.0.0.1"]}}``).
    """
    quota = MockQuota()
    quota.settings.access_token_ttl_s = access_token_ttl_s
    quota.settings.default_balance = balance
    quota_runner, quota_url = await start_mock_quota(quota, "127.0.0.1", quota_port)
    app_runner: web.AppRunner | None = None
    try:
        # The app needs the internal listener's URL before the sidecar starts.
        internal_port = internal_port or _free_port()
        internal_url = f"http://127.0.0.1:{internal_port}"
        events_secret = secrets.token_urlsafe(32)
        app_runner = web.AppRunner(
            create_host_app(internal_url=internal_url, events_secret=events_secret)
        )
        await app_runner.setup()
        app_site = web.TCPSite(app_runner, "127.0.0.1", app_port)
        await app_site.start()
        app_url = _url_of(app_runner)
        port = port or _free_port()
        webhook_secret = "whsec_" + secrets.token_hex(24)
        quota.settings.webhook_url = f"http://{host}:{port}/auth/quota/webhook"
        quota.settings.webhook_secret = webhook_secret
        client = quota.register_client(
            name="Demo Notes AI",
            redirect_uris=[
                f"http://{name}:{port}/auth/quota/callback" for name in ("localhost", "127.0.0.1")
            ],
            allowed_scopes=["credits.read", "credits.spend"],
        )
        sections: dict[str, dict[str, Any]] = {
            "quota": {
                "base_url": quota_url,
                "client_id": client.client_id,
                "client_secret": client.client_secret,
            },
            "listen": {
                "public": f"{host}:{port}",
                "internal": f"127.0.0.1:{internal_port}",
                "admin": "off",  # the demo is one process on a laptop: nothing to probe
            },
            "upstream": {"url": app_url},
            "session": {"secret": secrets.token_urlsafe(32)},
            "log": {"format": "text"},
            "webhooks": {"secret": webhook_secret},
            "events": {"url": f"{app_url}/quota/events", "secret": events_secret},
            # /v1 402 answers name the top-up page on the origin the browser uses.
            "topup": {"public_url": f"http://localhost:{port}"},
        }
        for name, values in (config_overrides or {}).items():
            sections.setdefault(name, {}).update(values)
        config = build_config(sections, env={})
        async with open_services(config) as services:
            sidecar = Sidecar(services)
            await sidecar.start()
            try:
                yield Demo(
                    url=f"http://localhost:{port}",
                    quota_url=quota_url,
                    app_url=app_url,
                    internal_url=sidecar.urls["internal"],
                    quota=quota,
                    config=config,
                    webhook_secret=webhook_secret,
                    events_secret=events_secret,
                )
            finally:
                await sidecar.stop()
    finally:
        if app_runner is not None:
            await app_runner.cleanup()
        await quota_runner.cleanup()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _url_of(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


async def _run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with running_demo(
            port=args.port,
            quota_port=args.quota_port,
            app_port=args.app_port,
            internal_port=args.internal_port,
            access_token_ttl_s=args.access_token_ttl,
            balance=args.balance,
        ) as demo:
            print(
                f"\n  quota-sidecar demo is running.\n\n"
                f"  Open {demo.url} in your browser, sign in with any name, click\n"
                f"  'Connect Quota Wallet', approve on the emulator's consent page, then chat.\n"
                f"  Below $1 the page offers a top-up through the emulator's checkout; wallet\n"
                f"  events (Quota's webhooks, passed on by the sidecar) are listed on the page.\n\n"
                f"  emulator (Quota)   {demo.quota_url}\n"
                f"  demo app           {demo.app_url}\n"
                f"  internal listener  {demo.internal_url}\n\n"
                f"  Ctrl-C stops everything.\n",
                flush=True,
            )
            await stop.wait()
    except OSError as exc:
        print(f"quota-sidecar demo: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        print("  (another demo running? choose other ports with --port etc.)", file=sys.stderr)
        return 1
    return 0


def main(args: argparse.Namespace) -> int:
    from sidecar import log

    log.configure("info", "text")
    return asyncio.run(_run(args))
