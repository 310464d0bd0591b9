"""The checks that ask something over the network: Quota, its clock, the client, the app, Redis.

Each call has a short timeout (``timeout_s``, at most five seconds), and ``sidecar.doctor.runner``
runs the independent ones at once, so a doctor run takes about as long as its slowest answer.
Answers are read the way the sidecar reads them (the same identity rules, the same token-call
code), so a pass here means the sidecar will get the same answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import secrets
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import aiohttp

from sidecar.config import Config
from sidecar.doctor.result import CheckResult, Status, failed, passed, skipped, warned
from sidecar.errors import QuotaUnavailable, StoreUnavailable
from sidecar.identity import valid_user_id
from sidecar.oauth import QuotaClient, QuotaOAuthError
from sidecar.services import make_sealer
from sidecar.tokens.factory import create_store

DISCOVERY_PATH = "/.well-known/openid-configuration"
# Token expiry is kept on each replica's clock; beyond this the refresh margin (30 s) is gone.
MAX_CLOCK_SKEW_S = 30.0
_PASSWORD_IN_URL = re.compile(r"(//[^:/@]*:)[^@/]*@")
_PASSWORD_OPTION = re.compile(r"(?i)(password=)[^&]*")


def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds, sock_connect=seconds)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        # "Connect call failed ('127.0.0.1', 3000)" says less than "connection refused".
        code = error.errno or 0  # DNS errors (socket.gaierror) have negative codes
        text = os.strerror(code) if code > 0 else error.strerror or str(error)
        return text.lower() if text else type(exc).__name__
    return type(exc).__name__


# -- Quota: discovery, clock, client credentials ---------------------------------------------


async def check_quota(
    http: aiohttp.ClientSession,
    config: Config,
    *,
    production: bool,
    clock: Callable[[], float],
    timeout_s: float,
) -> tuple[CheckResult, CheckResult]:
    """``quota`` (reachable, and its discovery issuer is quota.base_url) and ``clock``."""
    base = config.quota.base_url.rstrip("/")
    started, t0 = clock(), time.perf_counter()
    try:
        async with http.get(
            base + DISCOVERY_PATH,
            headers={"Accept": "application/json"},
            timeout=_timeout(timeout_s),
            allow_redirects=False,
        ) as resp:
            status, raw, date = resp.status, await resp.read(), resp.headers.get("Date")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return (
            failed(
                "quota",
                f"cannot reach Quota at {base} ({_reason(exc)})",
                "check quota.base_url (QUOTA_BASE_URL), and that this host can reach it: DNS, "
                "egress rules, an outbound proxy",
            ),
            skipped("clock", "not compared: Quota did not answer"),
        )
    elapsed_ms = (time.perf_counter() - t0) * 1000
    clock_result = _clock(date, local=(started + clock()) / 2)
    wrong_root = (
        "set quota.base_url (QUOTA_BASE_URL) to Quota's API root, such as "
        "https://api.usequota.ai or the emulator's http://127.0.0.1:5181"
    )
    if status != 200:
        return (
            failed("quota", f"{base}{DISCOVERY_PATH} answered HTTP {status}", wrong_root),
            clock_result,
        )
    try:
        issuer = json.loads(raw).get("issuer")
    except (ValueError, UnicodeDecodeError, AttributeError):
        issuer = None
    if not isinstance(issuer, str):
        return (
            failed(
                "quota", f"{base}{DISCOVERY_PATH} is not an OpenID discovery document", wrong_root
            ),
            clock_result,
        )
    if issuer.rstrip("/") != base:
        return (
            failed(
                "quota",
                f"{base} answers, but its discovery document names the issuer {issuer}: "
                "another server, or Quota under another address",
                f"set quota.base_url (QUOTA_BASE_URL) to {issuer}",
            ),
            clock_result,
        )
    detail = f"{base} answered discovery in {elapsed_ms:.0f} ms; the issuer matches"
    if production and urlsplit(base).scheme != "https":
        return (
            warned(
                "quota",
                f"{detail}, but over plain http in production mode",
                "use Quota's https address in production",
            ),
            clock_result,
        )
    return passed("quota", detail), clock_result


def _clock(date_header: str | None, *, local: float) -> CheckResult:
    if not date_header:
        return warned(
            "clock",
            "Quota's answer had no Date header, so the clocks were not compared",
            "check this host's time sync by hand (timedatectl, chronyc tracking)",
        )
    try:
        # Date has whole seconds, cut down: the true time is up to a second later.
        remote = parsedate_to_datetime(date_header).timestamp() + 0.5
    except (TypeError, ValueError):
        return warned(
            "clock", f"Quota's Date header is unreadable ({date_header!r})", "check time sync"
        )
    skew = local - remote
    if abs(skew) < 1.5:
        return passed("clock", "this host's clock agrees with Quota's Date header (within 1 s)")
    direction = "ahead of" if skew > 0 else "behind"
    detail = f"this host's clock is {abs(skew):.0f} s {direction} Quota's Date header"
    if abs(skew) <= MAX_CLOCK_SKEW_S:
        return passed("clock", detail)
    return failed(
        "clock",
        detail,
        "sync it with NTP (timedatectl set-ntp true, or chrony): token expiry times are kept on "
        "this clock and compared by every replica on its own, so clocks that disagree refresh "
        "too late (401s) or too often",
    )


async def check_client(
    http: aiohttp.ClientSession, config: Config, *, quota: CheckResult, timeout_s: float
) -> CheckResult:
    """Does Quota accept the client id and secret? A refresh with a made-up token tells:
    ``invalid_grant`` means the client authenticated, ``invalid_client`` that it did not."""
    if quota.status not in (Status.PASS, Status.WARN):
        return skipped("client", "not checked: Quota's discovery check failed")
    settings = dataclasses.replace(
        config.quota,
        timeout_s=min(timeout_s, config.quota.timeout_s),
        connect_timeout_s=min(timeout_s, config.quota.connect_timeout_s),
    )
    client_id = config.quota.client_id
    made_up = "quota_refresh_doctor_" + secrets.token_urlsafe(16)
    try:
        await QuotaClient(http, settings).refresh(made_up)
    except QuotaOAuthError as exc:
        if exc.code == "invalid_grant":
            return passed(
                "client", f"Quota accepts client {client_id} with this secret (refresh test)"
            )
        if exc.code in ("invalid_client", "unauthorized_client"):
            return failed(
                "client",
                f"Quota does not accept client {client_id} with this secret ({exc.code})",
                "set QUOTA_CLIENT_ID and QUOTA_CLIENT_SECRET to the app's (`quota-sidecar init` "
                "writes them to .env); after rotating the secret, update every replica",
            )
        return warned(
            "client",
            f"a test refresh got {exc.status} {exc.code}, so the client credentials are unproven",
            "try a connect in a browser",
        )
    except QuotaUnavailable as exc:
        return failed(
            "client",
            f"the token endpoint did not answer usefully ({exc.detail or exc.message})",
            "check that quota.base_url is Quota's API root and that Quota is up",
        )
    return warned(
        "client", "Quota accepted a made-up refresh token", "report this to Quota's support"
    )


# -- the host app's identity probe -----------------------------------------------------------


async def check_probe(
    http: aiohttp.ClientSession, config: Config, *, cookie: str | None, timeout_s: float
) -> CheckResult:
    """``identity-probe`` (no cookies: must not name anyone) or, with a cookie, must name one."""
    name = "identity-probe" if cookie is None else "identity-probe-signed-in"
    header = config.identity.header
    url = config.upstream.url.rstrip("/") + config.upstream.identity_probe_path
    headers = {"Accept": "application/json"}
    if cookie is not None:
        headers["Cookie"] = cookie
    try:
        async with http.get(
            url,
            headers=headers,
            timeout=_timeout(min(timeout_s, config.upstream.probe_timeout_s)),
            allow_redirects=False,
        ) as resp:
            await resp.read()
            status, values = resp.status, resp.headers.getall(header, [])
    except (aiohttp.ClientError, TimeoutError) as exc:
        return failed(
            name,
            f"cannot reach the app at {config.upstream.url} ({_reason(exc)})",
            "start the app, or set upstream.url to where the sidecar can reach it",
        )
    user = values[0] if len(values) == 1 else None
    named = user is not None and valid_user_id(user, config.identity.max_length)
    if status in (404, 405):
        return failed(
            name,
            f"GET {url} answered {status}: upstream.identity_probe_path is not the app's "
            "identity endpoint",
            "set upstream.identity_probe_path to the endpoint's path, or add a GET endpoint "
            f"that answers the signed-in user's id in {header} and 401 otherwise",
        )
    if status >= 500:
        return failed(name, f"GET {url} answered {status}", "look at the app's logs")
    if cookie is None:
        return _anonymous(url, status, header, user if named else None, bool(values))
    if 200 <= status < 300 and named:
        return passed(name, f"with the test cookie, GET {url} names the user {user!r}")
    if 200 <= status < 300:
        return failed(
            name,
            f"with the test cookie, GET {url} answered {status} without a usable {header}",
            f"answer the signed-in user's id in the {header} response header (identity.header)",
        )
    return failed(
        name,
        f"with the test cookie, GET {url} answered {status}: the app did not see a signed-in "
        "session",
        "copy a fresh session cookie from a signed-in browser (its name=value); check that "
        "the app accepts the Host of upstream.url",
    )


def _anonymous(
    url: str, status: int, header: str, user: str | None, any_header: bool
) -> CheckResult:
    name = "identity-probe"
    if 200 <= status < 300 and user is not None:
        return failed(
            name,
            f"GET {url} without cookies answered {status} with {header}: {user!r}, so every "
            f"visitor would be {user!r} and spend that wallet",
            "answer 401 when the request carries no signed-in session; never fall back to a "
            "default user",
        )
    if 200 <= status < 300:
        what = f"an unusable {header}" if any_header else f"no {header}"
        return warned(
            name,
            f"GET {url} without cookies answered {status} with {what}: the sidecar reads that "
            "as signed out, but a catch-all route (a single-page app's index.html) answers "
            "like this too",
            "make sure this path is the identity endpoint, and have it answer 401 when signed out",
        )
    return passed(name, f"GET {url} without cookies answers {status} (signed out)")


# -- the token store -------------------------------------------------------------------------


def shown_store(spec: str) -> str:
    """The store's URL with any password masked."""
    return _PASSWORD_OPTION.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1***@", spec))


async def check_store(config: Config, *, timeout_s: float) -> CheckResult:
    spec = config.tokens.store
    if spec == "memory":
        return passed(
            "token-store",
            "memory: tokens live in this one process and are lost on restart; fine for one "
            "replica (set REDIS_URL to run more)",
        )
    shown = shown_store(spec)
    try:
        store = create_store(spec, make_sealer(config), prefix=config.tokens.key_prefix)
    except ValueError as exc:
        return failed("token-store", str(exc), "fix tokens.store (REDIS_URL)")
    try:
        t0 = time.perf_counter()
        async with asyncio.timeout(timeout_s):
            await store.ping()
            first_ms = (time.perf_counter() - t0) * 1000
            t1 = time.perf_counter()
            await store.ping()
        rtt_ms = (time.perf_counter() - t1) * 1000
    except (StoreUnavailable, TimeoutError) as exc:
        reason = "no answer in time" if isinstance(exc, TimeoutError) else exc.detail or exc.message
        return failed(
            "token-store",
            f"{shown} does not answer PING ({reason})",
            "start Redis, or fix tokens.store (REDIS_URL); meanwhile the sidecar starts but "
            "answers 503 store_unavailable wherever it needs tokens",
        )
    finally:
        with contextlib.suppress(StoreUnavailable, OSError):
            await store.close()
    return passed(
        "token-store",
        f"{shown} answers PING in {rtt_ms:.1f} ms (the first, with connecting: {first_ms:.1f} ms)",
    )
