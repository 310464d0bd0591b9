"""``quota-sidecar init``: from nothing to a registered Quota app and the files to run it.

    check the targets  →  ask what is missing  →  sign in  →  register the app  →  write the files
    (nothing exists)      (a terminal only)       (sess_…)    (dev + prod callbacks) (all or none)

Every flag has a prompt and every prompt a flag, so the same command serves a person at a
terminal and a CI job. The target files are checked before anything else, so a second run does
not register a second app only to find it cannot write; any error from Quota stops the command
before a file (or a directory) is created. The client secret, which Quota shows once, goes into
``.env`` and the Kubernetes Secret and onto the terminal only with ``--show-secret``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import aiohttp

from sidecar.config import DEFAULT_SCOPES
from sidecar.config_loader import ConfigError, load_config
from sidecar.secret import Secret
from sidecar.setup import developer
from sidecar.setup.developer import DeveloperApiError, RegisteredApp
from sidecar.setup.files import (
    CONFIG_PATH,
    ENV_PATH,
    SECRET_MANIFEST_PATH,
    OutputFile,
    Setup,
    TargetsExist,
    env_values,
    render,
    write_all,
)
from sidecar.setup.gen_secret import new_secret
from sidecar.setup.options import (
    InitError,
    InitOptions,
    add_arguments,
    join_names,
    options_from,
    preflight,
    shown_path,
)

__all__ = ["InitError", "InitOptions", "InitResult", "add_arguments", "main", "run_init"]

EXIT_INTERRUPTED = 130


@dataclass(frozen=True, slots=True)
class InitResult:
    app: RegisteredApp
    files: list[OutputFile]
    signed_in_as: str | None  # the email, when init signed in (rather than using a session)


def main(args: argparse.Namespace) -> int:
    try:
        options, show_secret = options_from(args, os.environ)
        result = asyncio.run(run_init(options))
    except InitError as exc:
        print(f"quota-sidecar init: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except (KeyboardInterrupt, EOFError):
        print("\nquota-sidecar init: stopped; no file was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    report(result, options, sys.stdout, show_secret=show_secret)
    return 0


async def run_init(options: InitOptions) -> InitResult:
    """Sign in, register the app, write the files. ``InitError`` says why it stopped."""
    preflight(options.directory, force=options.force)
    creds = options.credentials
    connector = aiohttp.TCPConnector(limit=4)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as http:
        if creds.session_token is not None:
            session = creds.session_token.reveal()
        else:
            session = await _login(http, options)
        app = await _register(http, options, session)
    setup = Setup(
        app=app,
        session_secret=Secret(new_secret()),
        quota_base_url=options.quota_base_url,
        redirect_uri=options.production_redirect_uri,
        upstream_url=options.upstream_url,
        secret_name=options.secret_name,
    )
    files = render(setup)
    try:
        write_all(
            options.directory,
            files,
            force=options.force,
            validate=lambda staged: _validate(staged[CONFIG_PATH], env_values(setup)),
        )
    except TargetsExist as exc:
        raise InitError(
            f"{join_names(exc.paths)} appeared while the app was being registered; nothing was "
            f"written. The app {app.client_id} exists at Quota without its secret saved: "
            "delete it there, then run init again"
        ) from None
    except OSError as exc:
        raise InitError(
            f"cannot write the files in {options.directory} ({exc.strerror or exc}); the app "
            f"{app.client_id} exists at Quota without its secret saved: delete it there, fix "
            "the directory, then run init again"
        ) from None
    return InitResult(
        app=app, files=files, signed_in_as=None if creds.session_token else creds.email
    )


async def _login(http: aiohttp.ClientSession, options: InitOptions) -> str:
    creds = options.credentials
    assert creds.email is not None
    assert creds.password is not None
    try:
        return await developer.login(
            http, options.quota_base_url, creds.email, creds.password.reveal()
        )
    except DeveloperApiError as exc:
        if exc.code == "invalid_credentials":
            raise InitError(
                f"Quota refused the sign-in for {creds.email}: wrong email or password "
                "(invalid_credentials); nothing was written"
            ) from None
        raise _quota_failure(exc, "signing in to Quota") from None


async def _register(
    http: aiohttp.ClientSession, options: InitOptions, session_token: str
) -> RegisteredApp:
    try:
        return await developer.register_app(
            http,
            options.quota_base_url,
            session_token,
            name=options.app_name,
            redirect_uris=options.redirect_uris,
            scopes=DEFAULT_SCOPES,
        )
    except DeveloperApiError as exc:
        if exc.code in ("invalid_token", "invalid_api_key") and options.credentials.source:
            raise InitError(
                f"Quota refused the developer session from {options.credentials.source} "
                f"({exc.code}): it expired or belongs to another Quota; sign in with --email "
                "instead; nothing was written"
            ) from None
        if exc.code == "invalid_redirect_uri":
            raise InitError(
                f"Quota refused the callback {options.production_redirect_uri}: {exc.message} "
                "(invalid_redirect_uri); give --public-url as https://your.host; nothing was "
                "written"
            ) from None
        raise _quota_failure(exc, "registering the app") from None


def _quota_failure(exc: DeveloperApiError, doing: str) -> InitError:
    if exc.code == "unreachable":
        return InitError(
            f"{exc.message}; check --quota-base-url and this machine's network; nothing was written"
        )
    return InitError(f"{doing} failed: {exc.message} ({exc.code}); nothing was written")


def _validate(config_path: Path, env: Mapping[str, str]) -> None:
    """The config about to be written must load with the ``.env`` about to be written."""
    try:
        load_config(config_path, env)
    except ConfigError as exc:
        raise InitError(
            f"the generated configuration does not load; nothing was written: {exc}"
        ) from None


# -- the report ------------------------------------------------------------------------------


_DESCRIPTIONS = {
    CONFIG_PATH: "settings; the secrets appear only as ${…} references",
    ENV_PATH: "the secrets, for a workstation or a VM",
    SECRET_MANIFEST_PATH: "the secrets as a Kubernetes Secret",
}


def report(result: InitResult, options: InitOptions, out: TextIO, *, show_secret: bool) -> None:
    app = result.app
    where = options.quota_base_url
    if result.signed_in_as:
        print(f"Signed in to Quota at {where} as {result.signed_in_as}.", file=out)
    else:
        print(f"Using the developer session from {options.credentials.source}.", file=out)
    print(f'Registered the Quota app "{app.name}" at {where}:', file=out)
    print(f"  client id       {app.client_id}", file=out)
    secret = app.client_secret.reveal() if show_secret else "(hidden; --show-secret prints it)"
    print(f"  client secret   {secret}", file=out)
    for i, uri in enumerate(app.redirect_uris):
        print(f"  {'redirect URIs' if i == 0 else '':<15} {uri}", file=out)
    print(f"  allowed scopes  {' '.join(app.allowed_scopes)}", file=out)
    directory = shown_path(options.directory)
    print("Wrote:" if directory == "." else f"Wrote in {directory}:", file=out)
    width = max(len(str(f.relative)) for f in result.files)
    for item in result.files:
        note = _DESCRIPTIONS.get(item.relative, "")
        print(f"  {item.relative!s:<{width}}  {item.mode:04o}  {note}", file=out)
    print(
        "Quota shows a client secret only once: .env and the Secret now hold the only copy. "
        "Keep both out of version control.",
        file=out,
    )
    print("Next:", file=out)
    if directory != ".":
        print(f"  cd {directory}", file=out)
    print("  set -a; . ./.env; set +a", file=out)
    print(f"  quota-sidecar doctor --config {CONFIG_PATH}", file=out)
    print(f"  quota-sidecar run --config {CONFIG_PATH}", file=out)
