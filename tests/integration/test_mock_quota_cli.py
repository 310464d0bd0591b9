"""Running the Quota emulator: ``start_mock_quota`` in a loop and the ``mock-quota`` process."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

import sidecar
from sidecar.mock_quota import MockQuota, start_mock_quota
from sidecar.mock_quota.cli import add_arguments, main, settings_from

REPO_ROOT = Path(sidecar.__file__).resolve().parents[1]
RUN_CLI = (
    "import argparse, sys\n"
    "from sidecar.mock_quota.cli import add_arguments, main\n"
    "parser = argparse.ArgumentParser()\n"
    "add_arguments(parser)\n"
    "sys.exit(main(parser.parse_args(sys.argv[1:])))\n"
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_options_default_to_the_demo_setup() -> None:
    args = parse()
    assert (args.host, args.port) == ("127.0.0.1", 5181)
    assert args.client_id == "quota_client_demo"
    assert args.client_secret == "quota_secret_demo_local_only"
    assert args.redirect_uris is None
    assert parse(
        "--redirect-uri", "http://a/cb", "--redirect-uri", "http://b/cb"
    ).redirect_uris == [
        "http://a/cb",
        "http://b/cb",
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ("--access-token-ttl", "0"),
        ("--balance", "-5"),
        ("--chunk-delay", "-1"),
        ("--webhook-url", "hooks.example/in"),
        ("--webhook-secret", "not-a-whsec"),
    ],
)
def test_bad_option_values_exit_2_before_serving(
    argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(parse(*argv)) == 2
    assert "mock-quota:" in capsys.readouterr().err


def test_webhook_options_set_the_webhook_settings() -> None:
    settings = settings_from(
        parse("--webhook-url", "http://127.0.0.1:5180/hooks", "--webhook-secret", "whsec_cli")
    )
    assert settings.webhook_url == "http://127.0.0.1:5180/hooks"
    assert settings.webhook_secret == "whsec_cli"
    default = settings_from(parse())
    assert default.webhook_url is None
    assert default.webhook_secret.startswith("whsec_")


def test_a_busy_port_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(parse("--port", str(port))) == 1
    assert "cannot listen" in capsys.readouterr().err


async def test_start_mock_quota_on_port_0_reports_the_real_port() -> None:
    runner, url = await start_mock_quota(MockQuota(), "127.0.0.1", 0)
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        assert not url.endswith(":0")
        async with (
            ClientSession() as http,
            http.get(f"{url}/.well-known/openid-configuration") as r,
        ):
            assert (await r.json())["issuer"] == url
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_the_process_serves_the_seeded_client_and_exits_0_when_stopped(
    signum: signal.Signals,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RUN_CLI,
        "--port",
        "0",
        "--client-id",
        "quota_client_cli",
        "--client-secret",
        "quota_secret_cli",
        "--balance",
        "77",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
        assert "client_id=quota_client_cli" in line
        assert "client_secret=quota_secret_cli" in line
        match = re.search(r"http://[\d.]+:\d+", line)
        assert match, line
        url = match.group()
        async with ClientSession() as http:
            form = {
                "grant_type": "client_credentials",
                "client_id": "quota_client_cli",
                "client_secret": "quota_secret_cli",
            }
            async with http.post(f"{url}/oauth/token", data=form) as resp:
                assert (await resp.json())["error"] == "unsupported_grant_type"
            async with http.get(f"{url}/_mock/wallets/x@example.com") as resp:
                assert (await resp.json())["balance"] == 77
        proc.send_signal(signum)
        assert await asyncio.wait_for(proc.wait(), timeout=15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_the_process_signs_webhooks_for_the_url_and_secret_it_was_given(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
) -> None:
    received: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    async def hook(request: web.Request) -> web.Response:
        received.put_nowait((request.headers["X-Quota-Signature"], await request.read()))
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/hooks", hook)
    hook_url = str((await aiohttp_server(receiver)).make_url("/hooks"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RUN_CLI,
        "--port",
        "0",
        "--webhook-url",
        hook_url,
        "--webhook-secret",
        "whsec_cli_test",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
        match = re.search(r"http://[\d.]+:\d+", line)
        assert match, line
        assert hook_url in (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
        async with (
            ClientSession() as http,
            http.put(f"{match.group()}/_mock/wallets/x@example.com", json={"balance": 9}) as resp,
        ):
            assert resp.status == 200
        signature, body = await asyncio.wait_for(received.get(), timeout=10)
        expected = hmac.new(b"whsec_cli_test", body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(signature, expected)
        assert json.loads(body)["type"] == "balance.updated"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
