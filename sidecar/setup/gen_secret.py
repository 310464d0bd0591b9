"""Fresh secrets: 32 random bytes, base64url without padding (43 characters).

One shape serves every secret the sidecar takes: ``SESSION_SECRET`` (at least 32 characters) and
``tokens.encryption_keys`` (32 bytes in base64url).
"""

from __future__ import annotations

import argparse
import secrets

SECRET_BYTES = 32
MAX_COUNT = 100  # a typo guard: nobody needs more keys than this at once


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--count",
        type=_count,
        default=1,
        metavar="N",
        help=f"how many secrets to print, one per line (1-{MAX_COUNT}; default 1)",
    )


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if not 1 <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_COUNT}, got {value}")
    return value


def main(args: argparse.Namespace) -> int:
    for _ in range(args.count):
        print(new_secret())
    return 0
