"""Running the emulator: the ``mock-quota`` subcommand's options and loop, and ``start_mock_quota``.

The top-level ``quota-sidecar`` command owns the parser; it calls ``add_arguments`` on its
``mock-quota`` subparser and ``main`` with the parsed namespace. The process seeds one client
(its secret is printed: this is a local emulator), serves until SIGINT or SIGTERM, exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from aiohttp import web

from .app import create_app
from .clients import Client
from .scopes import KNOWN_SCOPES
from .settings import DEFAULT_WEBHOOK_SECRET, MockSettings
from .state import SEED_DEVELOPER_EMAIL, SEED_DEVELOPER_PASSWORD, MockQuota

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5181
DEMO_CLIENT_ID = "quota_client_demo"
DEMO_CLIENT_SECRET = "quota_secret_demo_local_only"  # noqa: S105 - a published local-only value
# The demo app's callback (DESIGN.md §7).
DEMO_REDIRECT_URI = "http://localhost:5180/auth/quota/callback"
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")  # noqa: S104 - compared against, never bound here


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port to listen on (0 = any free port)"
    )
    parser.add_argument("--client-id", default=DEMO_CLIENT_ID, help="the seeded app's client id")
    parser.add_argument(
        "--client-secret", default=DEMO_CLIENT_SECRET, help="the seeded app's client secret"
    )
    parser.add_argument(
        "--redirect-uri",
        action="append",
        dest="redirect_uris",
        metavar="URI",
        help=f"a redirect URI of the seeded app; repeatable (default {DEMO_REDIRECT_URI})",
    )
    parser.add_argument(
        "--access-token-ttl", type=float, metavar="SECONDS", help="access token lifetime"
    )
    parser.add_argument("--balance", type=int, metavar="CREDITS", help="a new wallet's balance")
    parser.add_argument(
        "--chunk-delay", type=float, metavar="SECONDS", help="pause between streamed chunks"
    )
    parser.add_argument(
        "--auto-approve-email", metavar="EMAIL", help="approve every consent as this account"
    )
    parser.add_argument(
        "--webhook-url", metavar="URL", help="POST Quota's webhook events to this URL"
    )
    parser.add_argument(
        "--webhook-secret",
        metavar="whsec_…",
        help="the key that signs each event's X-Quota-Signature "
        f"(default: the published local-only {DEFAULT_WEBHOOK_SECRET})",
    )


def settings_from(args: argparse.Namespace) -> MockSettings:
    """The settings the options ask for; ``ValueError`` naming every bad one."""
    settings = MockSettings()
    overrides = {
        "access_token_ttl_s": args.access_token_ttl,
        "default_balance": args.balance,
        "chunk_delay_s": args.chunk_delay,
        "auto_approve_email": args.auto_approve_email,
        "webhook_url": args.webhook_url,
        "webhook_secret": args.webhook_secret,
    }
    settings.apply({key: value for key, value in overrides.items() if value is not None})
    return settings


async def start_mock_quota(state: MockQuota, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Serve ``state`` on ``host:port`` in this loop; the runner and the base URL it answers on.

    ``port=0`` picks a free port; the URL carries the real one. The caller cleans up the runner.
    """
    runner = web.AppRunner(create_app(state))
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    real_port = runner.addresses[0][1]
    shown = DEFAULT_HOST if host in _WILDCARD_HOSTS else host
    if ":" in shown:
        shown = f"[{shown}]"
    return runner, f"http://{shown}:{real_port}"


async def _serve(state: MockQuota, client: Client, host: str, port: int) -> int:
    try:
        runner, url = await start_mock_quota(state, host, port)
    except OSError as exc:
        print(f"mock-quota: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    print(
        f"Quota emulator on {url}  client_id={client.client_id}  "
        f"client_secret={client.client_secret}  "
        f"(developer login {SEED_DEVELOPER_EMAIL} / {SEED_DEVELOPER_PASSWORD})",
        flush=True,
    )
    if state.settings.webhook_url:
        print(f"Webhook events go to {state.settings.webhook_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C raises instead
            loop.add_signal_handler(signum, stop.set)
            handled.append(signum)
    try:
        await stop.wait()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        await runner.cleanup()
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except ValueError as exc:
        print(f"mock-quota: {exc}", file=sys.stderr)
        return 2
    state = MockQuota(settings=settings)
    client = state.register_client(
        name="Quota demo app",
        redirect_uris=args.redirect_uris or [DEMO_REDIRECT_URI],
        allowed_scopes=KNOWN_SCOPES,
        client_id=args.client_id,
        client_secret=args.client_secret,
    )
    try:
        return asyncio.run(_serve(state, client, args.host, args.port))
    except KeyboardInterrupt:
        return 0
