"""The container image: the Dockerfile's shape, and its install step run for real without Docker.

No Docker engine runs here, so the install step is replayed by hand exactly as the Dockerfile
writes it: the build context the Dockerfile copies, ``pip wheel --no-deps``, then a fresh venv
that installs the wheel from binary wheels only with ``-c constraints.txt``. The installed
command then serves and stops, and leaves nothing written behind (the image's root filesystem
is read-only).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import aiohttp
import pytest
from packaging.requirements import Requirement
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import ListenConfig
from tests.integration.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
CONSTRAINTS = ROOT / "constraints.txt"
INSTALL_TIMEOUT_S = 600
START_TIMEOUT_S = 30.0


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for word, rest in instructions():
        if word == "FROM":
            found.append([])
        if found:
            found[-1].append((word, rest))
    return found


def pins() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[name] = version
    return out


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# -- the Dockerfile ----------------------------------------------------------------------------


def test_the_image_is_built_in_two_stages_on_python_slim() -> None:
    builder, runtime = stages()
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim") in instructions()
    assert builder[0][1].startswith("${PYTHON_IMAGE}")
    assert runtime[0][1].startswith("${PYTHON_IMAGE}")
    assert builder[0][1].endswith("AS builder")
    assert runtime[0][1].endswith("AS runtime")
    (wheel,) = [rest for word, rest in builder if word == "RUN"]
    assert "pip wheel" in wheel
    assert "--no-deps" in wheel


def test_the_runtime_stage_installs_pinned_binary_wheels_and_no_compiler() -> None:
    runtime = stages()[1]
    runs = " ".join(rest for word, rest in runtime if word == "RUN")
    assert "--no-cache-dir" in runs
    assert "--only-binary=:all:" in runs
    assert "-c /tmp/constraints.txt" in runs
    assert '*.whl)[fast]"' in runs, "the image installs the fast extra (uvloop)"
    for tool in ("apt-get", "gcc", "build-essential", "python3-dev"):
        assert tool not in runs


def test_the_image_runs_quota_sidecar_as_a_numeric_non_root_user() -> None:
    runtime = dict(stages()[1])
    assert runtime["USER"] == "10001:10001"
    assert json.loads(runtime["ENTRYPOINT"]) == ["quota-sidecar"]
    assert json.loads(runtime["CMD"]) == ["run"]
    assert "PYTHONDONTWRITEBYTECODE=1" in runtime["ENV"]
    for label in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{label}=" in runtime["LABEL"]


def test_the_image_exposes_the_default_listener_ports() -> None:
    defaults = ListenConfig()
    ports = {
        int(address.rsplit(":", 1)[1])
        for address in (defaults.public, defaults.internal, defaults.admin_address or "")
    }
    exposed = {int(p) for word, rest in instructions() if word == "EXPOSE" for p in rest.split()}
    assert exposed == ports


def test_the_build_context_admits_every_file_the_dockerfile_copies() -> None:
    admitted = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    ]
    for word, rest in instructions():
        if word != "COPY" or rest.startswith("--from"):
            continue
        for source in rest.split()[:-1]:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in admitted, f"{source} is not in the build context"


def test_constraints_pin_the_whole_runtime_closure_within_the_declared_bounds() -> None:
    pinned = pins()
    stale = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "pin-constraints"), "--check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert stale.returncode == 0, stale.stderr
    declared = [Requirement(r) for r in metadata.requires("quota-sidecar") or []]
    for req in declared:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # the test extra
        version = pinned[canonical(req.name)]
        assert req.specifier.contains(version), f"{req.name}=={version} outside {req.specifier}"
    assert not {"pytest", "mypy", "ruff", "kubernetes-validate"} & set(pinned)


# -- the install step, for real ----------------------------------------------------------------


def _run(command: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, timeout=INSTALL_TIMEOUT_S, **kw
    )  # type: ignore[call-overload]
    assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result  # type: ignore[no-any-return]


def _files_under(*roots: Path) -> set[Path]:
    return {p for root in roots for p in root.rglob("*")}


@pytest.mark.slow
async def test_the_dockerfile_install_step_builds_a_wheel_that_installs_and_serves(
    tmp_path: Path,
) -> None:
    # The build context, as the Dockerfile copies it.
    context = tmp_path / "src"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, context / name)
    shutil.copytree(
        ROOT / "sidecar", context / "sidecar", ignore=shutil.ignore_patterns("__pycache__")
    )
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-cache-dir", "--no-deps",
          "--wheel-dir", str(wheels), str(context)])  # fmt: skip
    (wheel,) = wheels.glob("quota_sidecar-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python, command = venv / "bin" / "python", venv / "bin" / "quota-sidecar"
    _run([str(python), "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
          "--only-binary=:all:", "-c", str(CONSTRAINTS), f"{wheel}[fast]"])  # fmt: skip
    _run([str(python), "-m", "pip", "check"])
    frozen = _run([str(python), "-m", "pip", "freeze"]).stdout
    installed = {
        canonical(n): v for n, _, v in (line.partition("==") for line in frozen.splitlines())
    }
    for name, version in pins().items():
        assert installed.get(name) == version, f"{name}: {installed.get(name)} != {version}"
    assert "pytest" not in installed

    help_text = _run([str(command), "--help"]).stdout
    assert "usage: quota-sidecar" in help_text

    # It serves: /healthz and /metrics answer, SIGTERM exits 0, and nothing was written.
    workdir = tmp_path / "work"
    workdir.mkdir()
    before = _files_under(venv, workdir)
    admin = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONDONTWRITEBYTECODE": "1",
        "QUOTA_CLIENT_ID": "quota_client_image",
        "QUOTA_CLIENT_SECRET": "quota_secret_image",
        "SESSION_SECRET": "image-session-secret-of-32-characters",
        "QUOTA_SIDECAR__LISTEN__PUBLIC": f"127.0.0.1:{free_port()}",
        "QUOTA_SIDECAR__LISTEN__INTERNAL": f"127.0.0.1:{free_port()}",
        "QUOTA_SIDECAR__LISTEN__ADMIN": f"127.0.0.1:{admin}",
        "QUOTA_SIDECAR__SHUTDOWN__DRAIN_DELAY_S": "0",
    }
    proc = subprocess.Popen(
        [str(command), "run"],
        env=env,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        async with aiohttp.ClientSession() as http:
            while True:
                assert proc.poll() is None, proc.communicate()[0].decode()
                try:
                    async with http.get(f"http://127.0.0.1:{admin}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "the installed sidecar did not start"
                await asyncio.sleep(0.1)
            async with http.get(f"http://127.0.0.1:{admin}/metrics") as resp:
                names = {f.name for f in text_string_to_metric_families(await resp.text())}
        assert "quota_sidecar_requests" in names
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode == 0
        assert '"event loop: uvloop"' in output, "the image's sidecar runs on uvloop"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert _files_under(venv, workdir) == before, "the installed sidecar wrote files"
