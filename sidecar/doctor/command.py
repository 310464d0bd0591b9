"""``quota-sidecar doctor``: load the configuration, run every check, print, exit 0 or 1."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from sidecar.config_loader import ConfigError, load_config, resolve_path
from sidecar.doctor import local
from sidecar.doctor.result import all_ok, to_json, to_text
from sidecar.doctor.runner import DoctorOptions, run_checks, unrun


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Everything but ``--config``, which the top-level parser adds as for every command."""
    parser.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list of {name, ok, status, detail, fix} instead of lines",
    )
    parser.add_argument(
        "--test-cookie",
        type=_cookie,
        metavar="NAME=VALUE",
        help="a signed-in session cookie of your app: the identity probe must name its user",
    )
    parser.add_argument(
        "--production",
        action="store_true",
        help="judge as in production (https callbacks) even if quota.base_url is not Quota's",
    )


def _cookie(text: str) -> str:
    name, sep, _ = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"must be name=value, got {text!r}")
    return text.strip()


def main(args: argparse.Namespace) -> int:
    options = DoctorOptions(production=args.production, test_cookie=args.test_cookie)
    path = resolve_path(args.config, os.environ)
    source = str(path) if path is not None else "the environment (no config file)"
    try:
        config = load_config(path)
    except ConfigError as exc:
        results = unrun(local.config_invalid(exc, source), options)
    else:
        results = asyncio.run(run_checks(config, options, source=source))
    if args.json:
        print(to_json(results))
    else:
        sys.stdout.write(to_text(results, unicode=_can_print("✓✗")))
    return 0 if all_ok(results) else 1


def _can_print(text: str) -> bool:
    try:
        text.encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True
