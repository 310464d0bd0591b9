"""Run every check against one configuration; the network ones at once.

    config, secrets, redirect-uri, internal-listener     read the configuration only
    quota → client                                       discovery first: no point testing a
                                                         client on a server that is not Quota
    identity-probe[, identity-probe-signed-in]           the host app
    token-store                                          Redis PING (memory: nothing to ask)
    clock                                                from the Date of Quota's answer

The order of the report is fixed (``CHECKS``), whatever order the answers come in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from sidecar.config import PRODUCTION_BASE_URL, Config
from sidecar.doctor import local, remote
from sidecar.doctor.result import CheckResult, failed, skipped

# At most this long for any one network answer.
DEFAULT_TIMEOUT_S = 5.0
CHECKS = (
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
)


@dataclass(frozen=True, slots=True)
class DoctorOptions:
    # Judge as in production (https callbacks) even when quota.base_url is not Quota's own.
    production: bool = False
    # "name=value" of a signed-in session: the identity probe must then name a user.
    test_cookie: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S


def production_mode(config: Config, options: DoctorOptions) -> bool:
    return options.production or config.quota.base_url.rstrip("/") == PRODUCTION_BASE_URL


async def run_checks(
    config: Config,
    options: DoctorOptions | None = None,
    *,
    clock: Callable[[], float] = time.time,
    source: str = "the configuration",
) -> list[CheckResult]:
    """Every check on ``config``, in report order. Never raises for a failed check."""
    options = options or DoctorOptions()
    production = production_mode(config, options)
    timeout_s = min(options.timeout_s, DEFAULT_TIMEOUT_S)
    results = [
        local.config_loaded(source),
        local.check_secrets(config),
        local.check_redirect_uri(config, production=production),
        local.check_internal_listener(config),
    ]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:

        async def quota_then_client() -> list[CheckResult]:
            quota, clock_result = await remote.check_quota(
                http, config, production=production, clock=clock, timeout_s=timeout_s
            )
            client = await remote.check_client(http, config, quota=quota, timeout_s=timeout_s)
            return [quota, client, clock_result]

        async def probe(cookie: str | None) -> list[CheckResult]:
            return [await remote.check_probe(http, config, cookie=cookie, timeout_s=timeout_s)]

        async def store() -> list[CheckResult]:
            return [await remote.check_store(config, timeout_s=timeout_s)]

        jobs = [
            _guarded(("quota", "client", "clock"), quota_then_client()),
            _guarded(("identity-probe",), probe(None)),
            _guarded(("token-store",), store()),
        ]
        if options.test_cookie is not None:
            jobs.append(_guarded(("identity-probe-signed-in",), probe(options.test_cookie)))
        for found in await asyncio.gather(*jobs):
            results += found
    return in_report_order(results)


async def _guarded(names: tuple[str, ...], job: Awaitable[list[CheckResult]]) -> list[CheckResult]:
    """A check that breaks reports itself as failed; it does not take the others down."""
    try:
        return await job
    except Exception as exc:
        return [
            failed(name, f"the check itself failed: {type(exc).__name__}: {exc}", "report this")
            for name in names
        ]


def in_report_order(results: list[CheckResult]) -> list[CheckResult]:
    return sorted(results, key=lambda r: CHECKS.index(r.name) if r.name in CHECKS else len(CHECKS))


def unrun(results: list[CheckResult], options: DoctorOptions) -> list[CheckResult]:
    """``results`` (the config's failure) and every other check, skipped."""
    done = {r.name for r in results}
    wanted = [
        name
        for name in CHECKS
        if name not in done
        and (name != "identity-probe-signed-in" or options.test_cookie is not None)
    ]
    return in_report_order(
        results + [skipped(name, "not run: the configuration does not load") for name in wanted]
    )
