"""``quota-sidecar init`` against the Quota emulator, and the small setup commands.

``init`` runs as a real process (flags and stdin, or a pseudo-terminal for the questions) while
the emulator serves from this test's event loop; assertions read the emulator's state, the files
on disk, and everything the process printed.
"""

from __future__ import annotations

import asyncio
import base64
import os
import stat
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sidecar import __version__
from sidecar.config_loader import build_config
from sidecar.mock_quota import MockQuota, create_app
from sidecar.mock_quota.clients import Client
from sidecar.mock_quota.state import SEED_DEVELOPER_EMAIL, SEED_DEVELOPER_PASSWORD
from sidecar.setup.files import OutputFile, TargetsExist, write_all
from tests.integration.conftest import free_port

DEV_CALLBACK = "http://localhost:5180/auth/quota/callback"
PROD_URL = "https://app.example.com"
PROD_CALLBACK = "https://app.example.com/auth/quota/callback"
TARGETS = ("config/sidecar.yaml", ".env", "k8s/quota-sidecar-secret.yaml")
PROCESS_TIMEOUT_S = 60.0
PROMPT_TIMEOUT_S = 30.0


@dataclass
class Emulator:
    quota: MockQuota
    url: str

    def apps(self) -> list[Client]:
        return self.quota.apps_of(SEED_DEVELOPER_EMAIL)

    def calls_to(self, path: str) -> int:
        return sum(1 for r in self.quota.requests if r.path == path)


@dataclass
class Completed:
    code: int
    out: str
    err: str


@pytest.fixture
async def emulator(aiohttp_server: Any) -> Emulator:
    quota = MockQuota()
    server = await aiohttp_server(create_app(quota))
    return Emulator(quota, str(server.make_url("")).rstrip("/"))


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """No QUOTA_* or REDIS_URL from the caller's shell: only what the test gives."""
    return {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8", **(extra or {})}


async def run_cli(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None, stdin: bytes | None = None
) -> Completed:
    """``quota-sidecar ARGS`` as a process, awaited so the emulator in this loop can answer it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        *args,
        cwd=cwd,
        env=dict(env) if env is not None else clean_env(),
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), PROCESS_TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Completed(proc.returncode, out.decode(), err.decode())


async def init_with_password(emulator: Emulator, cwd: Path, *flags: str) -> Completed:
    return await run_cli(
        "init",
        "--quota-base-url",
        emulator.url,
        "--email",
        SEED_DEVELOPER_EMAIL,
        "--password-stdin",
        *flags,
        cwd=cwd,
        stdin=f"{SEED_DEVELOPER_PASSWORD}\n".encode(),
    )


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value for key, value in pairs if not key.startswith("#")}


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def files_under(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``root``: its bytes and its mtime in nanoseconds."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- registering and writing -----------------------------------------------------------------


async def test_init_registers_the_app_with_exactly_the_callbacks_and_scopes_asked(
    emulator: Emulator, tmp_path: Path
) -> None:
    result = await init_with_password(
        emulator, tmp_path, "--public-url", PROD_URL, "--name", "Shop"
    )

    assert result.code == 0, result.err
    (app,) = emulator.apps()
    assert app.name == "Shop"
    assert app.redirect_uris == (DEV_CALLBACK, PROD_CALLBACK)
    assert app.allowed_scopes == ("credits.read", "credits.spend")
    assert app.client_id in result.out
    assert app.client_secret not in result.out + result.err


async def test_init_writes_the_secret_files_for_the_owner_only_and_the_config_without_secrets(
    emulator: Emulator, tmp_path: Path
) -> None:
    result = await init_with_password(emulator, tmp_path, "--public-url", PROD_URL)
    assert result.code == 0, result.err
    (app,) = emulator.apps()

    assert sorted(files_under(tmp_path)) == sorted(TARGETS)  # no temporary file left behind
    assert mode_of(tmp_path / ".env") == 0o600
    assert mode_of(tmp_path / "k8s/quota-sidecar-secret.yaml") == 0o600
    assert mode_of(tmp_path / "config/sidecar.yaml") == 0o644

    env = read_env(tmp_path / ".env")
    assert set(env) == {
        "QUOTA_CLIENT_ID",
        "QUOTA_CLIENT_SECRET",
        "SESSION_SECRET",
        "QUOTA_BASE_URL",
    }
    assert env["QUOTA_CLIENT_ID"] == app.client_id
    assert env["QUOTA_CLIENT_SECRET"] == app.client_secret
    assert env["QUOTA_BASE_URL"] == emulator.url
    assert len(base64.urlsafe_b64decode(env["SESSION_SECRET"] + "=")) == 32

    manifest = yaml.safe_load((tmp_path / "k8s/quota-sidecar-secret.yaml").read_text())
    assert manifest["kind"] == "Secret"
    assert manifest["metadata"]["name"] == "quota-sidecar"
    assert manifest["stringData"] == {
        "QUOTA_CLIENT_ID": app.client_id,
        "QUOTA_CLIENT_SECRET": app.client_secret,
        "SESSION_SECRET": env["SESSION_SECRET"],
    }

    config_text = (tmp_path / "config/sidecar.yaml").read_text()
    assert app.client_secret not in config_text
    assert env["SESSION_SECRET"] not in config_text
    doc = yaml.safe_load(config_text)
    assert doc["quota"] == {
        "base_url": emulator.url,
        "client_id": "${QUOTA_CLIENT_ID}",
        "client_secret": "${QUOTA_CLIENT_SECRET}",
        "redirect_uri": PROD_CALLBACK,
    }
    assert doc["session"] == {"secret": "${SESSION_SECRET}"}


async def test_the_written_config_passes_check_config_with_the_env_file_loaded(
    emulator: Emulator, tmp_path: Path
) -> None:
    assert (await init_with_password(emulator, tmp_path, "--public-url", PROD_URL)).code == 0
    env = read_env(tmp_path / ".env")

    checked = await run_cli(
        "check-config", "--config", "config/sidecar.yaml", cwd=tmp_path, env=clean_env(env)
    )

    assert checked.code == 0, checked.err
    assert "configuration OK" in checked.err
    effective = yaml.safe_load(checked.out)
    assert effective["quota"]["client_id"] == env["QUOTA_CLIENT_ID"]
    assert effective["quota"]["client_secret"] == "***"
    assert effective["quota"]["base_url"] == emulator.url
    assert effective["quota"]["redirect_uri"] == PROD_CALLBACK
    assert effective["tokens"]["store"] == "memory"


async def test_init_for_development_only_registers_the_dev_callback_and_listens_on_it(
    emulator: Emulator, tmp_path: Path
) -> None:
    result = await init_with_password(emulator, tmp_path)

    assert result.code == 0, result.err
    (app,) = emulator.apps()
    assert app.redirect_uris == (DEV_CALLBACK,)
    assert app.name == tmp_path.name  # the directory's name by default
    doc = yaml.safe_load((tmp_path / "config/sidecar.yaml").read_text())
    assert "redirect_uri" not in doc["quota"]  # derived: http://localhost:5180/auth/quota/callback
    assert doc["listen"]["public"] == "localhost:5180"


async def test_init_writes_into_the_directory_named_by_dir_creating_it(
    emulator: Emulator, tmp_path: Path
) -> None:
    result = await init_with_password(emulator, tmp_path, "--dir", "deploy/shop")

    assert result.code == 0, result.err
    assert sorted(files_under(tmp_path / "deploy/shop")) == sorted(TARGETS)
    assert emulator.apps()[0].name == "shop"
    assert "cd deploy/shop" in result.out


async def test_show_secret_prints_the_client_secret(emulator: Emulator, tmp_path: Path) -> None:
    result = await init_with_password(emulator, tmp_path, "--show-secret")

    assert result.code == 0, result.err
    assert emulator.apps()[0].client_secret in result.out


async def test_a_developer_session_from_the_environment_needs_no_password(
    emulator: Emulator, tmp_path: Path
) -> None:
    session = emulator.quota.login(SEED_DEVELOPER_EMAIL, SEED_DEVELOPER_PASSWORD)
    assert session is not None

    result = await run_cli(
        "init",
        "--quota-base-url",
        emulator.url,
        cwd=tmp_path,
        env=clean_env({"QUOTA_SESSION_TOKEN": session}),
    )

    assert result.code == 0, result.err
    assert emulator.calls_to("/auth/login") == 0
    assert len(emulator.apps()) == 1
    assert "QUOTA_SESSION_TOKEN" in result.out
    assert session not in result.out + result.err


# -- refusing, and changing nothing ----------------------------------------------------------


async def test_a_second_run_without_force_changes_nothing_and_names_the_existing_files(
    emulator: Emulator, tmp_path: Path
) -> None:
    assert (await init_with_password(emulator, tmp_path)).code == 0
    before = files_under(tmp_path)
    requests_before = len(emulator.quota.requests)

    second = await init_with_password(emulator, tmp_path)

    assert second.code == 1
    assert "config/sidecar.yaml, .env and k8s/quota-sidecar-secret.yaml already exist" in second.err
    assert "--force" in second.err
    assert files_under(tmp_path) == before  # same bytes, same mtimes
    assert len(emulator.quota.requests) == requests_before  # Quota was not even asked
    assert len(emulator.apps()) == 1


async def test_one_existing_target_is_enough_to_create_nothing(
    emulator: Emulator, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("MINE=1\n")

    result = await init_with_password(emulator, tmp_path)

    assert result.code == 1
    assert ".env already exists" in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".env"]  # no config/ or k8s/ made
    assert (tmp_path / ".env").read_text() == "MINE=1\n"
    assert emulator.apps() == []


async def test_force_replaces_the_files_with_a_newly_registered_app(
    emulator: Emulator, tmp_path: Path
) -> None:
    assert (await init_with_password(emulator, tmp_path)).code == 0
    (tmp_path / ".env").chmod(0o644)  # someone loosened it meanwhile

    result = await init_with_password(emulator, tmp_path, "--force")

    assert result.code == 0, result.err
    first, second = emulator.apps()
    assert first.client_id != second.client_id
    assert read_env(tmp_path / ".env")["QUOTA_CLIENT_ID"] == second.client_id
    assert mode_of(tmp_path / ".env") == 0o600
    assert sorted(files_under(tmp_path)) == sorted(TARGETS)


async def test_a_wrong_password_exits_1_with_one_line_and_writes_nothing(
    emulator: Emulator, tmp_path: Path
) -> None:
    result = await run_cli(
        "init",
        "--quota-base-url",
        emulator.url,
        "--email",
        SEED_DEVELOPER_EMAIL,
        "--password-stdin",
        cwd=tmp_path,
        stdin=b"not-the-password\n",
    )

    assert result.code == 1
    assert result.err.count("\n") == 1
    assert "wrong email or password (invalid_credentials)" in result.err
    assert list(tmp_path.iterdir()) == []
    assert emulator.apps() == []


async def test_a_plain_http_production_url_is_refused_by_quota_and_nothing_is_written(
    emulator: Emulator, tmp_path: Path
) -> None:
    result = await init_with_password(emulator, tmp_path, "--public-url", "http://app.example.com")

    assert result.code == 1
    assert result.err.count("\n") == 1
    assert "invalid_redirect_uri" in result.err
    assert "http://app.example.com/auth/quota/callback" in result.err
    assert list(tmp_path.iterdir()) == []
    assert emulator.apps() == []


async def test_an_unreachable_quota_exits_1_and_writes_nothing(tmp_path: Path) -> None:
    result = await run_cli(
        "init",
        "--quota-base-url",
        f"http://127.0.0.1:{free_port()}",
        "--session-token",
        "sess_unused",
        cwd=tmp_path,
    )

    assert result.code == 1
    assert result.err.count("\n") == 1
    assert "cannot reach Quota at http://127.0.0.1:" in result.err
    assert "connection refused" in result.err
    assert list(tmp_path.iterdir()) == []


async def test_a_stale_developer_session_is_named_as_the_problem(
    emulator: Emulator, tmp_path: Path
) -> None:
    result = await run_cli(
        "init",
        "--quota-base-url",
        emulator.url,
        cwd=tmp_path,
        env=clean_env({"QUOTA_SESSION_TOKEN": "sess_expired"}),
    )

    assert result.code == 1
    assert "refused the developer session from $QUOTA_SESSION_TOKEN (invalid_token)" in result.err
    assert "sess_expired" not in result.err
    assert list(tmp_path.iterdir()) == []


async def test_without_credentials_or_a_terminal_init_says_how_to_sign_in(
    emulator: Emulator, tmp_path: Path
) -> None:
    result = await run_cli("init", "--quota-base-url", emulator.url, cwd=tmp_path)

    assert result.code == 2
    assert "QUOTA_SESSION_TOKEN" in result.err
    assert "--password-stdin" in result.err
    assert list(tmp_path.iterdir()) == []
    assert len(emulator.quota.requests) == 0


def test_staged_files_are_all_removed_when_validation_fails(tmp_path: Path) -> None:
    files = [
        OutputFile(Path("config/sidecar.yaml"), 0o644, "quota: {}\n"),
        OutputFile(Path(".env"), 0o600, "A=1\n"),
    ]

    def refuse(staged: dict[Path, Path]) -> None:
        assert all(mode_of(p) == f.mode for p, f in zip(staged.values(), files, strict=True))
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        write_all(tmp_path, files, force=False, validate=refuse)

    assert files_under(tmp_path) == {}  # only the (empty) config/ directory remains


def test_write_all_refuses_an_existing_target_before_touching_anything(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("old\n")

    with pytest.raises(TargetsExist) as caught:
        write_all(tmp_path, [OutputFile(Path("k8s/s.yaml"), 0o600, "x")], force=False)

    assert caught.value.paths == [Path(".env")]
    assert not (tmp_path / "k8s").exists()


# -- a person at a terminal ------------------------------------------------------------------


class Terminal:
    """The controlling side of a pseudo-terminal: wait for text, type answers. Bounded waits."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.output = b""
        self._seen = 0
        os.set_blocking(fd, False)

    async def _read_some(self, deadline: float) -> bool:
        """Append what arrives; ``False`` once the other side is closed."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(self.fd, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, max(0.0, deadline - loop.time()))
        finally:
            loop.remove_reader(self.fd)
        try:
            chunk = os.read(self.fd, 4096)
        except BlockingIOError:
            return True
        except OSError:  # EIO: the process and all its copies of the terminal are gone
            return False
        self.output += chunk
        return bool(chunk)

    async def expect(self, text: bytes) -> None:
        deadline = asyncio.get_running_loop().time() + PROMPT_TIMEOUT_S
        while text not in self.output[self._seen :]:
            try:
                open_ = await self._read_some(deadline)
            except TimeoutError:
                raise AssertionError(
                    f"no {text!r} on the terminal; it shows {self.output!r}"
                ) from None
            if not open_:
                raise AssertionError(f"the terminal closed before {text!r}: {self.output!r}")
        self._seen = self.output.index(text, self._seen) + len(text)

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    async def drain(self) -> None:
        deadline = asyncio.get_running_loop().time() + PROMPT_TIMEOUT_S
        while await self._read_some(deadline):
            pass


async def test_init_in_a_terminal_asks_for_what_is_missing_and_never_shows_the_password(
    emulator: Emulator, tmp_path: Path
) -> None:
    project = tmp_path / "bakery"
    project.mkdir()
    controller, terminal = os.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar",
            "init",
            "--quota-base-url",
            emulator.url,
            cwd=project,
            env=clean_env(),
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            start_new_session=True,  # no controlling terminal but this one (never the test's)
        )
    finally:
        os.close(terminal)
    screen = Terminal(controller)
    try:
        await screen.expect(b"Quota developer email: ")
        screen.type(SEED_DEVELOPER_EMAIL)
        await screen.expect(b"Quota password (not shown): ")
        screen.type(SEED_DEVELOPER_PASSWORD)
        await screen.expect(b"App name [bakery]: ")
        screen.type("")  # the default
        await screen.expect(b"(Enter: development only): ")
        screen.type("https://bakery.example.com")
        await screen.expect(b"Next:")
        await screen.drain()
        code = await asyncio.wait_for(proc.wait(), PROCESS_TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(controller)

    assert code == 0, screen.output.decode(errors="replace")
    (app,) = emulator.apps()
    assert app.name == "bakery"
    assert app.redirect_uris == (DEV_CALLBACK, "https://bakery.example.com/auth/quota/callback")
    assert app.allowed_scopes == ("credits.read", "credits.spend")
    assert SEED_DEVELOPER_EMAIL.encode() in screen.output  # echoed as typed
    assert SEED_DEVELOPER_PASSWORD.encode() not in screen.output
    assert app.client_secret.encode() not in screen.output
    assert mode_of(project / ".env") == 0o600
    assert mode_of(project / "k8s/quota-sidecar-secret.yaml") == 0o600


# -- gen-secret, version, help ---------------------------------------------------------------


def run_sync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        check=False,
        timeout=PROCESS_TIMEOUT_S,
    )


def test_gen_secret_prints_fresh_32_byte_keys_the_config_accepts() -> None:
    result = run_sync("gen-secret", "--count", "3")

    assert result.returncode == 0, result.stderr
    keys = result.stdout.split()
    assert len(set(keys)) == 3
    assert all(len(base64.urlsafe_b64decode(k + "=")) == 32 for k in keys)
    config = build_config(
        {
            "quota": {"client_id": "c", "client_secret": "s"},
            "session": {"secret": keys[0]},
            "tokens": {"encryption_keys": keys[1:]},
        },
        env={},
    )
    assert len(config.tokens.encryption_keys) == 2


def test_gen_secret_refuses_a_count_out_of_range() -> None:
    result = run_sync("gen-secret", "--count", "0")

    assert result.returncode == 2
    assert "between 1 and 100" in result.stderr


def test_version_names_the_sidecar_python_and_aiohttp() -> None:
    result = run_sync("version")

    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"quota-sidecar {__version__}"
    assert f"aiohttp {aiohttp.__version__}" in lines
    assert any(line.startswith(f"Python {sys.version.split()[0]}") for line in lines)


@pytest.mark.parametrize("command", ["init", "doctor", "gen-secret", "version"])
def test_each_setup_command_has_help(command: str) -> None:
    result = run_sync(command, "--help")

    assert result.returncode == 0, result.stderr
    assert f"usage: quota-sidecar {command}" in result.stdout
