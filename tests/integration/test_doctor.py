"""``quota-sidecar doctor`` against real parties: the emulator, a stub app, a real Redis.

Most tests call ``run_checks`` with a ``Config`` in this process; a few run the command, to
prove the exit code, the text with its fixes, and that ``--json`` parses. Each broken variant
breaks one thing and expects exactly that check to fail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidecar.config import Config
from sidecar.doctor import CheckResult, DoctorOptions, Status, run_checks
from sidecar.doctor.local import check_redirect_uri
from sidecar.doctor.runner import production_mode
from sidecar.mock_quota import MockQuota, create_app
from sidecar.mock_quota.clients import Client
from sidecar.mock_quota.state import SEED_DEVELOPER_EMAIL, SEED_DEVELOPER_PASSWORD
from sidecar.secret import Secret
from sidecar.setup.gen_secret import new_secret
from tests.integration.conftest import free_port
from tests.support import IDENTITY_COOKIE, create_stub_upstream, make_config

GOOD_SECRET = new_secret()
ALL_CHECKS = [
    "config",
    "secrets",
    "quota",
    "client",
    "redirect-uri",
    "identity-probe",
    "identity-probe-signed-in",
    "internal-listener",
    "token-store",
    "clock",
]
PROCESS_TIMEOUT_S = 60.0


@dataclass
class Healthy:
    """Everything a doctor run needs, each part working."""

    quota: MockQuota
    quota_url: str
    client: Client
    upstream_url: str
    redis_url: str
    redis_prefix: str

    def config(self, **sections: Mapping[str, Any]) -> Config:
        base: dict[str, dict[str, Any]] = {
            "quota": {
                "base_url": self.quota_url,
                "client_id": self.client.client_id,
                "client_secret": self.client.client_secret,
            },
            "session": {"secret": GOOD_SECRET},
            "upstream": {"url": self.upstream_url},
            "tokens": {"store": self.redis_url, "key_prefix": self.redis_prefix},
        }
        for name, values in sections.items():
            base.setdefault(name, {}).update(values)
        return make_config(**base)

    def env(self) -> dict[str, str]:
        """The same set-up as environment variables, for the command."""
        return {
            "PATH": os.environ.get("PATH", ""),
            "LANG": "C.UTF-8",
            "QUOTA_BASE_URL": self.quota_url,
            "QUOTA_CLIENT_ID": self.client.client_id,
            "QUOTA_CLIENT_SECRET": self.client.client_secret,
            "SESSION_SECRET": GOOD_SECRET,
            "REDIS_URL": self.redis_url,
            "QUOTA_SIDECAR__UPSTREAM__URL": self.upstream_url,
            "QUOTA_SIDECAR__TOKENS__KEY_PREFIX": self.redis_prefix,
        }


async def serve(aiohttp_server: Any, app: web.Application) -> str:
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
async def healthy(aiohttp_server: Any, redis_url: str, redis_prefix: str) -> Healthy:
    quota = MockQuota()
    client = quota.register_client(name="Shop", redirect_uris=["http://localhost:5180/cb"])
    return Healthy(
        quota=quota,
        quota_url=await serve(aiohttp_server, create_app(quota)),
        client=client,
        upstream_url=await serve(aiohttp_server, create_stub_upstream().app),
        redis_url=redis_url,
        redis_prefix=redis_prefix,
    )


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def failures(results: list[CheckResult]) -> list[str]:
    return [r.name for r in results if r.status is Status.FAIL]


# -- a healthy set-up ------------------------------------------------------------------------


async def test_doctor_passes_every_check_against_a_healthy_set_up(healthy: Healthy) -> None:
    results = await run_checks(
        healthy.config(), DoctorOptions(test_cookie=f"{IDENTITY_COOKIE}=alice")
    )

    assert [r.name for r in results] == ALL_CHECKS
    assert {r.name: r.status for r in results} == dict.fromkeys(ALL_CHECKS, Status.PASS)
    checks = by_name(results)
    assert "names the user 'alice'" in checks["identity-probe-signed-in"].detail
    assert "answers 401" in checks["identity-probe"].detail
    assert "answers PING in" in checks["token-store"].detail
    assert "the issuer matches" in checks["quota"].detail
    assert "derived per request" in checks["redirect-uri"].detail


async def test_without_a_test_cookie_the_signed_in_probe_is_not_run(healthy: Healthy) -> None:
    results = await run_checks(healthy.config())

    assert [r.name for r in results] == [n for n in ALL_CHECKS if n != "identity-probe-signed-in"]
    assert failures(results) == []


async def test_a_memory_store_passes_with_a_note_that_it_is_one_process(healthy: Healthy) -> None:
    results = await run_checks(healthy.config(tokens={"store": "memory"}))

    store = by_name(results)["token-store"]
    assert store.status is Status.PASS
    assert "one process" in store.detail


# -- Quota -----------------------------------------------------------------------------------


async def test_an_unreachable_quota_fails_the_quota_check_and_skips_what_needs_it(
    healthy: Healthy,
) -> None:
    started = time.monotonic()
    results = await run_checks(
        healthy.config(quota={"base_url": f"http://127.0.0.1:{free_port()}"})
    )

    assert time.monotonic() - started < 5
    assert failures(results) == ["quota"]
    checks = by_name(results)
    assert "cannot reach Quota" in checks["quota"].detail
    assert "QUOTA_BASE_URL" in (checks["quota"].fix or "")
    assert checks["client"].status is Status.SKIP
    assert checks["clock"].status is Status.SKIP


async def test_a_discovery_issuer_other_than_the_base_url_fails_with_the_right_url(
    healthy: Healthy, aiohttp_server: Any
) -> None:
    async def discovery(request: web.Request) -> web.Response:
        return web.json_response({"issuer": "https://api.usequota.ai"})

    imposter = web.Application()
    imposter.router.add_get("/.well-known/openid-configuration", discovery)
    results = await run_checks(
        healthy.config(quota={"base_url": await serve(aiohttp_server, imposter)})
    )

    assert failures(results) == ["quota"]
    quota = by_name(results)["quota"]
    assert "names the issuer https://api.usequota.ai" in quota.detail
    assert quota.fix == "set quota.base_url (QUOTA_BASE_URL) to https://api.usequota.ai"
    assert by_name(results)["client"].status is Status.SKIP


async def test_a_client_secret_quota_does_not_know_fails_the_client_check(
    healthy: Healthy,
) -> None:
    results = await run_checks(healthy.config(quota={"client_secret": "quota_secret_wrong"}))

    assert failures(results) == ["client"]
    client = by_name(results)["client"]
    assert "invalid_client" in client.detail
    assert "QUOTA_CLIENT_SECRET" in (client.fix or "")


async def test_a_clock_two_minutes_ahead_of_quotas_fails_the_clock_check(
    healthy: Healthy,
) -> None:
    results = await run_checks(healthy.config(), clock=lambda: time.time() + 120)

    assert failures(results) == ["clock"]
    clock = by_name(results)["clock"]
    assert "120 s ahead of Quota's" in clock.detail
    assert "NTP" in (clock.fix or "")


# -- the host app's identity probe -----------------------------------------------------------


async def test_a_probe_path_that_answers_404_fails_with_the_probe_path_fix(
    healthy: Healthy, aiohttp_server: Any
) -> None:
    no_such_route = await serve(aiohttp_server, web.Application())
    results = await run_checks(healthy.config(upstream={"url": no_such_route}))

    assert failures(results) == ["identity-probe"]
    probe = by_name(results)["identity-probe"]
    assert "answered 404" in probe.detail
    assert "upstream.identity_probe_path" in (probe.fix or "")


async def test_a_probe_that_names_a_user_without_cookies_fails(
    healthy: Healthy, aiohttp_server: Any
) -> None:
    async def everyone_is_admin(request: web.Request) -> web.Response:
        return web.json_response({}, headers={"X-Quota-User": "admin"})

    app = web.Application()
    app.router.add_get("/quota/whoami", everyone_is_admin)
    results = await run_checks(healthy.config(upstream={"url": await serve(aiohttp_server, app)}))

    assert failures(results) == ["identity-probe"]
    probe = by_name(results)["identity-probe"]
    assert "every visitor would be 'admin'" in probe.detail
    assert "answer 401" in (probe.fix or "")


async def test_a_test_cookie_the_app_does_not_know_fails_the_signed_in_probe(
    healthy: Healthy,
) -> None:
    results = await run_checks(healthy.config(), DoctorOptions(test_cookie="session=stale"))

    assert failures(results) == ["identity-probe-signed-in"]
    assert "answered 401" in by_name(results)["identity-probe-signed-in"].detail


# -- the token store, secrets, listeners, callbacks ------------------------------------------


async def test_a_redis_that_does_not_answer_fails_the_store_check_quickly(
    healthy: Healthy,
) -> None:
    started = time.monotonic()
    results = await run_checks(
        healthy.config(tokens={"store": f"redis://:hunter2@127.0.0.1:{free_port()}/0"})
    )

    assert time.monotonic() - started < 5
    assert failures(results) == ["token-store"]
    store = by_name(results)["token-store"]
    assert "does not answer PING" in store.detail
    assert "hunter2" not in store.detail
    assert "start Redis" in (store.fix or "")


async def test_a_short_session_secret_fails_the_secrets_check(healthy: Healthy) -> None:
    config = healthy.config()
    config = dataclasses.replace(
        config, session=dataclasses.replace(config.session, secret=Secret("too-short"))
    )

    results = await run_checks(config)

    assert failures(results) == ["secrets"]
    secrets_check = by_name(results)["secrets"]
    assert "has 9 characters; at least 32" in secrets_check.detail
    assert "quota-sidecar gen-secret" in (secrets_check.fix or "")


async def test_a_placeholder_session_secret_is_a_warning(healthy: Healthy) -> None:
    results = await run_checks(healthy.config(session={"secret": "x" * 40}))

    assert by_name(results)["secrets"].status is Status.WARN
    assert failures(results) == []


async def test_an_http_redirect_uri_fails_in_production_mode(healthy: Healthy) -> None:
    config = healthy.config(quota={"redirect_uri": "http://app.example.com/auth/quota/callback"})

    results = await run_checks(config, DoctorOptions(production=True))

    assert failures(results) == ["redirect-uri"]
    redirect = by_name(results)["redirect-uri"]
    assert "which Quota refuses (invalid_redirect_uri)" in redirect.detail
    assert "https://app.example.com/auth/quota/callback" in (redirect.fix or "")


@pytest.mark.parametrize(
    ("sections", "production", "expected"),
    [
        (
            {"quota": {"redirect_uri": "https://app.example.com/auth/quota/callback"}},
            True,
            Status.PASS,
        ),
        (
            {"quota": {"redirect_uri": "http://localhost:5180/auth/quota/callback"}},
            False,
            Status.PASS,
        ),
        (
            {"quota": {"redirect_uri": "http://127.0.0.1:5180/auth/quota/callback"}},
            True,
            Status.WARN,
        ),
        (
            {"quota": {"redirect_uri": "http://app.example.com/auth/quota/callback"}},
            False,
            Status.FAIL,
        ),
        ({"quota": {"redirect_uri": "https://app.example.com/shop/callback"}}, True, Status.WARN),
        ({}, True, Status.FAIL),  # derived behind a TLS proxy nobody trusts: http
        ({"session": {"trusted_proxies": ["10.0.0.0/8"]}}, True, Status.PASS),
        (
            {"listen": {"public": "localhost:5180"}},
            True,
            Status.PASS,
        ),  # http://localhost is allowed
        ({}, False, Status.PASS),
    ],
)
def test_the_redirect_uri_is_judged_by_quotas_rule(
    sections: dict[str, dict[str, Any]], production: bool, expected: Status
) -> None:
    result = check_redirect_uri(make_config(**sections), production=production)

    assert result.status is expected, result.detail


async def test_the_production_base_url_turns_production_mode_on(healthy: Healthy) -> None:
    config = healthy.config()
    config = dataclasses.replace(
        config, quota=dataclasses.replace(config.quota, base_url="https://api.usequota.ai")
    )
    assert production_mode(config, DoctorOptions())
    assert not production_mode(healthy.config(), DoctorOptions())


@pytest.mark.parametrize(
    ("address", "key", "expected"),
    [
        ("127.0.0.1:8081", None, Status.PASS),
        ("[::1]:8081", None, Status.PASS),
        ("0.0.0.0:8081", "k" * 32, Status.PASS),
        ("0.0.0.0:8081", None, Status.FAIL),
    ],
)
async def test_the_internal_listener_must_be_loopback_or_need_a_key(
    healthy: Healthy, address: str, key: str | None, expected: Status
) -> None:
    config = healthy.config()
    config = dataclasses.replace(
        config,
        listen=dataclasses.replace(config.listen, internal=address),
        identity=dataclasses.replace(
            config.identity, internal_api_key=Secret(key) if key else None
        ),
    )

    results = await run_checks(config)

    internal = by_name(results)["internal-listener"]
    assert internal.status is expected, internal.detail
    if expected is Status.FAIL:
        assert "spend that user's wallet" in internal.detail
        assert "QUOTA_INTERNAL_API_KEY" in (internal.fix or "")


# -- the command -----------------------------------------------------------------------------


@dataclass
class Completed:
    code: int
    out: str
    err: str


async def run_doctor(*args: str, env: Mapping[str, str], cwd: Path) -> Completed:
    """The command as a process, awaited so the servers in this loop can answer it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "doctor",
        *args,
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), PROCESS_TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Completed(proc.returncode, out.decode(), err.decode())


async def test_the_command_prints_json_that_parses_and_exits_0_when_all_pass(
    healthy: Healthy, tmp_path: Path
) -> None:
    result = await run_doctor(
        "--json", "--test-cookie", f"{IDENTITY_COOKIE}=alice", env=healthy.env(), cwd=tmp_path
    )

    assert result.code == 0, result.out + result.err
    checks = json.loads(result.out)
    assert [c["name"] for c in checks] == ALL_CHECKS
    assert all(c["ok"] is True and c["fix"] is None for c in checks)
    assert set(checks[0]) == {"name", "ok", "status", "detail", "fix"}


async def test_the_command_exits_1_and_prints_the_fix_under_the_failed_check(
    healthy: Healthy, tmp_path: Path
) -> None:
    env = {**healthy.env(), "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}

    result = await run_doctor(env=env, cwd=tmp_path)

    assert result.code == 1
    lines = result.out.splitlines()
    failed = [i for i, line in enumerate(lines) if line.startswith("✗")]
    assert len(failed) == 1
    assert lines[failed[0]].startswith("✗ token-store")
    assert lines[failed[0] + 1].strip().startswith("fix: start Redis")
    assert sum(line.startswith("✓") for line in lines) == 8
    assert lines[-1] == "9 checks: 8 passed, 1 failed"


async def test_a_config_that_does_not_load_lists_every_problem_and_skips_the_rest(
    tmp_path: Path,
) -> None:
    (tmp_path / "sidecar.yaml").write_text("quota:\n  client_id: c\n  colour: blue\n")
    env = {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8", "SESSION_SECRET": "short"}

    result = await run_doctor("--config", "sidecar.yaml", "--json", env=env, cwd=tmp_path)

    assert result.code == 1
    checks = {c["name"]: c for c in json.loads(result.out)}
    assert checks["config"]["ok"] is False
    for problem in ("quota.colour: unknown key", "quota.client_secret: required", "session.secret"):
        assert problem in checks["config"]["detail"]
    assert checks["secrets"]["status"] == "fail"
    assert "quota-sidecar gen-secret" in checks["secrets"]["fix"]
    assert {c["status"] for n, c in checks.items() if n not in ("config", "secrets")} == {"skip"}


async def test_a_freshly_initialised_directory_passes_doctor(
    healthy: Healthy, tmp_path: Path
) -> None:
    """The path the README walks: init against the emulator, then doctor with the .env loaded."""
    env = {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"}
    init = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "init",
        "--quota-base-url",
        healthy.quota_url,
        "--upstream-url",
        healthy.upstream_url,
        "--email",
        SEED_DEVELOPER_EMAIL,
        "--password-stdin",
        env=env,
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(
        init.communicate(f"{SEED_DEVELOPER_PASSWORD}\n".encode()), PROCESS_TIMEOUT_S
    )
    assert init.returncode == 0, err.decode()
    dotenv = dict(
        line.split("=", 1)
        for line in (tmp_path / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )

    result = await run_doctor(
        "--config",
        "config/sidecar.yaml",
        "--test-cookie",
        f"{IDENTITY_COOKIE}=alice",
        env={**env, **dotenv},
        cwd=tmp_path,
    )

    assert result.code == 0, result.out
    assert "✓ client" in result.out
    assert "10 checks: 10 passed" in result.out
