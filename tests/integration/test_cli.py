"""The command line: every command has help; run serves and stops cleanly on SIGTERM, and
imports neither redis-py (unless the store is Redis) nor the other commands' modules."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from sidecar.cli import build_parser, loop_factory, main
from tests.integration.conftest import free_port

COMMANDS = [
    "run",
    "check-config",
    "demo",
    "mock-quota",
    "rotate-keys",
    "init",
    "doctor",
    "gen-secret",
    "version",
]


@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]])
def test_every_command_has_help(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", *command, "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: quota-sidecar" in result.stdout


def _help_of(
    parser: argparse.ArgumentParser, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> str:
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]])
def test_help_reads_the_same_when_only_the_command_given_has_its_options(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    full = _help_of(build_parser(), command, capsys)
    assert _help_of(build_parser(command[0] if command else "run"), command, capsys) == full


def test_main_parses_the_options_of_the_command_it_is_given(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["gen-secret", "--count", "2"]) == 0
    assert len(capsys.readouterr().out.split()) == 2


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("quota-sidecar")
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0
    assert result.stdout.startswith("quota-sidecar ")


def test_run_refuses_an_internal_listener_off_loopback_without_a_key(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "QUOTA_CLIENT_ID": "c",
        "QUOTA_CLIENT_SECRET": "s",
        "SESSION_SECRET": "x" * 32,
        "QUOTA_SIDECAR__LISTEN__INTERNAL": "0.0.0.0:8081",
    }
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
        timeout=60,
    )
    assert result.returncode == 1
    assert "listen.internal: binds to 0.0.0.0, off loopback" in result.stderr
    assert "identity.internal_api_key" in result.stderr


@pytest.mark.parametrize(
    ("loop", "runs_on"), [("auto", "uvloop"), ("asyncio", "asyncio"), ("uvloop", "uvloop")]
)
async def test_run_serves_both_listeners_and_exits_0_on_sigterm(
    tmp_path: Path, loop: str, runs_on: str
) -> None:
    public, internal = free_port(), free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "QUOTA_SIDECAR_LOOP": loop,
        "QUOTA_CLIENT_ID": "c",
        "QUOTA_CLIENT_SECRET": "s",
        "SESSION_SECRET": "x" * 32,
        "QUOTA_SIDECAR__LISTEN__PUBLIC": f"127.0.0.1:{public}",
        "QUOTA_SIDECAR__LISTEN__INTERNAL": f"127.0.0.1:{internal}",
        "QUOTA_SIDECAR__UPSTREAM__URL": f"http://127.0.0.1:{free_port()}",
        "QUOTA_SIDECAR__LISTEN__ADMIN": f"127.0.0.1:{free_port()}",
        "QUOTA_SIDECAR__SHUTDOWN__DRAIN_DELAY_S": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    resp = await http.get(f"http://127.0.0.1:{internal}/v1/models")
                    break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline, "the sidecar did not start"
                    time.sleep(0.1)
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "identity_missing"
            resp = await http.get(f"http://127.0.0.1:{public}/anything")
            assert resp.status == 502  # no host app behind it
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        output = out.decode()
        assert '"logger": "sidecar.access"' in output
        assert "token store is in memory" in output
        assert f'"event loop: {runs_on}"' in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_an_unknown_loop_or_a_missing_uvloop_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(
        ValueError, match="QUOTA_SIDECAR_LOOP: must be one of auto, asyncio, uvloop"
    ):
        loop_factory("trio")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert loop_factory("auto") == ("asyncio", None)
    with pytest.raises(ValueError, match=r"pip install 'quota-sidecar\[fast\]'"):
        loop_factory("uvloop")


# ``run`` as shipped, reporting what it imported once both listeners are up, then stopping.
_RUN_AND_LIST_IMPORTS = """
import os, signal, sys
from sidecar import app, cli

start = app.Sidecar.start

async def started(self, *args, **kwargs):
    await start(self, *args, **kwargs)
    names = ("redis", "hiredis", "sidecar.demo", "sidecar.mock_quota", "sidecar.setup",
             "sidecar.doctor")
    found = sorted(m for m in sys.modules if m.split(".")[0] in names or m.startswith(names))
    print("imported:", " ".join(found) or "-", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

app.Sidecar.start = started
sys.exit(cli.main(["run"]))
"""


def _imports_of_run(tmp_path: Path, **env: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", _RUN_AND_LIST_IMPORTS],
        env={
            "PATH": os.environ.get("PATH", ""),
            "QUOTA_CLIENT_ID": "c",
            "QUOTA_CLIENT_SECRET": "s",
            "SESSION_SECRET": "x" * 32,
            "QUOTA_SIDECAR__LISTEN__PUBLIC": f"127.0.0.1:{free_port()}",
            "QUOTA_SIDECAR__LISTEN__INTERNAL": f"127.0.0.1:{free_port()}",
            "QUOTA_SIDECAR__LISTEN__ADMIN": f"127.0.0.1:{free_port()}",
            "QUOTA_SIDECAR__UPSTREAM__URL": f"http://127.0.0.1:{free_port()}",
            "QUOTA_SIDECAR__SHUTDOWN__DRAIN_DELAY_S": "0",
            **env,
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    listed = next(line for line in result.stdout.splitlines() if line.startswith("imported:"))
    return set(listed.split()[1:]) - {"-"}


def test_run_with_the_memory_store_never_imports_redis_or_the_other_commands(
    tmp_path: Path,
) -> None:
    assert _imports_of_run(tmp_path) == set()


async def test_run_with_a_redis_store_imports_redis_and_still_not_the_other_commands(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    imported = _imports_of_run(
        tmp_path, REDIS_URL=redis_url, QUOTA_SIDECAR__TOKENS__KEY_PREFIX=redis_prefix
    )
    assert {"redis", "redis.asyncio"} <= imported  # the listing sees redis-py when it is there
    assert not {name for name in imported if name.startswith("sidecar.")}
