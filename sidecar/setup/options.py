"""What ``init`` is asked to do: its flags, and questions at a terminal for what they leave out.

Every question has a flag, so a CI job never needs a terminal; with one, anything missing is
asked for (the password without echo, through ``getpass``). Prompts go to stderr, keeping stdout
for the report. ``preflight`` runs before the first question: a run that cannot finish (the
files exist, the directory is not writable) asks nothing and changes nothing.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sidecar.config import PRODUCTION_BASE_URL
from sidecar.secret import Secret
from sidecar.setup import developer
from sidecar.setup.files import (
    CALLBACK_PATH,
    DEFAULT_SECRET_NAME,
    DEV_REDIRECT_URI,
    TARGETS,
    existing_targets,
)

SESSION_TOKEN_ENV = "QUOTA_SESSION_TOKEN"  # noqa: S105 - a variable's name
DEFAULT_UPSTREAM_URL = "http://127.0.0.1:3000"
EXIT_FAILED = 1
EXIT_USAGE = 2
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_MAX_ASKS = 3  # a required answer left empty this many times ends the command


class InitError(Exception):
    """Why ``init`` stopped; the message is one line for the terminal."""

    def __init__(self, message: str, *, exit_code: int = EXIT_FAILED) -> None:
        self.message = message
        self.exit_code = exit_code
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Credentials:
    """A developer session to use as is, or an email and password to sign in with."""

    session_token: Secret | None = None
    email: str | None = None
    password: Secret | None = None
    source: str = ""  # where the session token came from, for messages


@dataclass(frozen=True, slots=True)
class InitOptions:
    directory: Path
    credentials: Credentials
    app_name: str
    quota_base_url: str = PRODUCTION_BASE_URL
    public_url: str | None = None
    upstream_url: str = DEFAULT_UPSTREAM_URL
    secret_name: str = DEFAULT_SECRET_NAME
    force: bool = False

    @property
    def production_redirect_uri(self) -> str | None:
        return None if self.public_url is None else callback_for(self.public_url)

    @property
    def redirect_uris(self) -> list[str]:
        production = self.production_redirect_uri
        return [DEV_REDIRECT_URI] + (
            [production] if production not in (None, DEV_REDIRECT_URI) else []
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        default=".",
        metavar="DIR",
        help=f"where to write {', '.join(map(str, TARGETS))} (default: the current directory)",
    )
    parser.add_argument(
        "--quota-base-url",
        default=PRODUCTION_BASE_URL,
        metavar="URL",
        help=f"Quota's API (default {PRODUCTION_BASE_URL}; the emulator: http://127.0.0.1:5181)",
    )
    parser.add_argument("--name", metavar="NAME", help="the app's name (default: DIR's name)")
    parser.add_argument(
        "--public-url",
        metavar="URL",
        help="your app's production address, e.g. https://app.example.com; its "
        f"{CALLBACK_PATH} is registered beside the development callback",
    )
    parser.add_argument(
        "--upstream-url",
        default=DEFAULT_UPSTREAM_URL,
        metavar="URL",
        help=f"your app, as the sidecar reaches it (default {DEFAULT_UPSTREAM_URL})",
    )
    parser.add_argument("--email", help="your Quota developer account's email")
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input (for scripts)",
    )
    parser.add_argument(
        "--session-token",
        metavar="TOKEN",
        help=f"an existing developer session (sess_…) instead of a password; "
        f"prefer ${SESSION_TOKEN_ENV}, which other users of this machine cannot see",
    )
    parser.add_argument(
        "--secret-name",
        default=DEFAULT_SECRET_NAME,
        metavar="NAME",
        help=f"the Kubernetes Secret's name (default {DEFAULT_SECRET_NAME})",
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite the files if they exist (a new app)"
    )
    parser.add_argument("--show-secret", action="store_true", help="also print the client secret")
    parser.add_argument("--no-input", action="store_true", help="never prompt, even in a terminal")


def callback_for(public_url: str) -> str:
    """``https://app.example.com`` → ``https://app.example.com/auth/quota/callback``."""
    base = public_url.rstrip("/")
    return base if base.endswith(CALLBACK_PATH) else base + CALLBACK_PATH


def _url_problem(value: str) -> str | None:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an absolute http(s) URL such as https://app.example.com"
    if parts.query or parts.fragment:
        return "must not carry a query or a fragment"
    return None


def _checked_url(flag: str, value: str) -> str:
    problem = _url_problem(value)
    if problem is not None:
        raise InitError(f"{flag} {problem}, got {value!r}", exit_code=EXIT_USAGE)
    return value.rstrip("/")


def preflight(directory: Path, *, force: bool) -> None:
    """What can be known before anyone types a password or Quota is asked anything."""
    if not force:
        _refuse_existing(directory)
    _check_writable(directory)


def _refuse_existing(directory: Path) -> None:
    present = existing_targets(directory)
    if present:
        shown = [shown_path(directory / p) for p in present]
        verb = "exists" if len(shown) == 1 else "exist"
        raise InitError(
            f"{join_names(shown)} already {verb}; nothing was changed "
            "(--force overwrites them, with a newly registered app)"
        )


def _check_writable(directory: Path) -> None:
    """Fail before registering anything if the files could not be written afterwards."""
    for relative in TARGETS:
        ancestor = (directory / relative).parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise InitError(
                f"cannot create files in {shown_path(ancestor)}: not a writable directory"
            )


def options_from(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[InitOptions, bool]:
    directory = Path(args.dir)
    base_url = _checked_url("--quota-base-url", args.quota_base_url)
    upstream_url = _checked_url("--upstream-url", args.upstream_url)
    public_url = None if args.public_url is None else _checked_url("--public-url", args.public_url)
    if not _K8S_NAME.fullmatch(args.secret_name):
        raise InitError(
            "--secret-name must be a Kubernetes name: lower-case letters, digits, '-' and '.'",
            exit_code=EXIT_USAGE,
        )
    if args.password_stdin and not args.email:
        raise InitError("--password-stdin needs --email", exit_code=EXIT_USAGE)
    interactive = sys.stdin.isatty() and not args.no_input
    # Before any question: a second run asks nothing and changes nothing.
    preflight(directory, force=args.force)
    credentials = _credentials(args, env, interactive=interactive)
    default_name = directory.resolve().name or "quota-sidecar"
    name = args.name
    if name is None:
        name = _ask("App name", default=default_name) if interactive else default_name
    if not name.strip():
        raise InitError("--name must not be empty", exit_code=EXIT_USAGE)
    if args.public_url is None and interactive:
        public_url = _ask_public_url()
    options = InitOptions(
        directory=directory,
        credentials=credentials,
        app_name=name.strip(),
        quota_base_url=base_url,
        public_url=public_url,
        upstream_url=upstream_url,
        secret_name=args.secret_name,
        force=args.force,
    )
    return options, args.show_secret


def _credentials(
    args: argparse.Namespace, env: Mapping[str, str], *, interactive: bool
) -> Credentials:
    """Flags first (a session, then an email), then ``$QUOTA_SESSION_TOKEN``, then questions."""
    if args.session_token:
        return _session(args.session_token, "--session-token")
    if args.email:
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        elif interactive:
            password = _ask_password()
        else:
            raise InitError(
                "--email needs the password: pipe it with --password-stdin, or run in a terminal",
                exit_code=EXIT_USAGE,
            )
        if not password:
            raise InitError("the password is empty", exit_code=EXIT_USAGE)
        return Credentials(email=args.email, password=Secret(password))
    if env.get(SESSION_TOKEN_ENV):
        return _session(env[SESSION_TOKEN_ENV], f"${SESSION_TOKEN_ENV}")
    if interactive:
        email = _ask("Quota developer email")
        return Credentials(email=email, password=Secret(_ask_password()))
    raise InitError(
        f"no way to sign in to Quota: set {SESSION_TOKEN_ENV} to a developer session (sess_…), "
        "or pass --email with --password-stdin, or run in a terminal to be asked",
        exit_code=EXIT_USAGE,
    )


def _session(token: str, source: str) -> Credentials:
    token = token.strip()
    if not token.startswith(developer.SESSION_PREFIX):
        raise InitError(
            f"{source} is not a developer session: those start with {developer.SESSION_PREFIX}",
            exit_code=EXIT_USAGE,
        )
    return Credentials(session_token=Secret(token), source=source)


def _ask(question: str, *, default: str | None = None, required: bool = True) -> str:
    """One line from the terminal; the prompt goes to stderr, so stdout stays the report."""
    shown = f"{question} [{default}]: " if default else f"{question}: "
    for _ in range(_MAX_ASKS):
        sys.stderr.write(shown)
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        answer = line.strip() or (default or "")
        if answer or not required:
            return answer
    raise InitError(f"no answer to {question!r}; nothing was changed")


def _ask_password() -> str:
    for _ in range(_MAX_ASKS):
        password = getpass.getpass("Quota password (not shown): ", stream=sys.stderr)
        if password:
            return password
    raise InitError("no password given; nothing was changed")


def _ask_public_url() -> str | None:
    for _ in range(_MAX_ASKS):
        answer = _ask(
            "Production URL of your app, e.g. https://app.example.com (Enter: development only)",
            required=False,
        )
        if not answer:
            return None
        problem = _url_problem(answer)
        if problem is None:
            return answer.rstrip("/")
        print(f"  That URL {problem}.", file=sys.stderr)
    raise InitError("no usable production URL; nothing was changed")


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it is below it, else absolute."""
    absolute = path.absolute()
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def join_names(paths: list[str] | list[Path]) -> str:
    shown = [str(p) for p in paths]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]
