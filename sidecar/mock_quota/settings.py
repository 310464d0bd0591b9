"""The emulator's runtime knobs: token lifetimes, wallets, injected faults, pacing, webhooks.

``MockSettings`` is deliberately mutable: tests and the ``PATCH /_mock/settings`` control route
change it while the server runs, and every handler reads it afresh on each request. ``apply``
validates a whole patch before changing anything, so a bad patch leaves the settings untouched
and its error lists every problem at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

from .clients import is_absolute_http_url

ErrorStyle = Literal["rfc6749", "quota"]
ERROR_STYLES: tuple[ErrorStyle, ...] = ("rfc6749", "quota")
WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 - Quota's prefix for webhook secrets
# A published local-only value, like the demo client's secret: the demo and tests can rely on it.
DEFAULT_WEBHOOK_SECRET = "whsec_mock_quota_local_only"  # noqa: S105


@dataclass
class MockSettings:
    """What the emulator does; every field may change at runtime."""

    # Quota's docs say "typically one hour".
    access_token_ttl_s: float = 3600
    # Authorization codes are short-lived everywhere; one minute is the common ceiling.
    code_ttl_s: float = 60
    # $5 in credits (1,000,000 credits = $1): enough for hundreds of demo chats.
    default_balance: int = 5_000_000
    # Sleep before answering /oauth/token (an asyncio.sleep, so it is cancellable).
    token_delay_s: float = 0
    # Sleep after a token call succeeded (codes spent, refresh tokens rotated) and before the
    # answer leaves: a client that dies meanwhile has lost the new pair, as in production.
    token_response_delay_s: float = 0
    # The next ``token_fail_count`` token calls answer ``token_fail_status`` (-1 = every call).
    token_fail_status: int | None = None
    token_fail_count: int = 0
    # Pause between SSE chunks so a stream visibly streams.
    chunk_delay_s: float = 0.02
    # Token-endpoint error bodies: RFC 6749 ``{"error", "error_description"}`` or Quota's
    # ``{"error": {"code", "message"}}``; the sidecar must understand both.
    oauth_error_style: ErrorStyle = "rfc6749"
    # When set, GET /oauth/authorize approves at once as this account (no consent page).
    auto_approve_email: str | None = None
    # Where events are POSTed; None sends nothing (a Quota app without a webhook endpoint).
    webhook_url: str | None = None
    # The key of each event's X-Quota-Signature (hex HMAC-SHA256 of the raw body).
    webhook_secret: str = DEFAULT_WEBHOOK_SECRET
    # balance.low fires when a spend takes a wallet from at least this to below it ($1).
    low_balance_threshold: int = 1_000_000

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def apply(self, changes: Mapping[str, object]) -> None:
        """Set every field in ``changes``, or none of them; raises ``ValueError`` listing problems."""
        problems: list[str] = []
        for key, value in changes.items():
            check = _CHECKS.get(key)
            if check is None:
                problems.append(f"{key}: unknown setting")
                continue
            problem = check(value)
            if problem is not None:
                problems.append(f"{key}: {problem}")
        if problems:
            raise ValueError("; ".join(problems))
        for key, value in changes.items():
            setattr(self, key, value)

    def take_token_failure(self) -> int | None:
        """The status the next token call must fail with, consuming one planned failure."""
        if self.token_fail_status is None or self.token_fail_count == 0:
            return None
        if self.token_fail_count > 0:
            self.token_fail_count -= 1
        return self.token_fail_status


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _non_negative_number(value: object) -> str | None:
    if not _is_number(value) or value < 0:
        return "expected a number >= 0"
    return None


def _positive_number(value: object) -> str | None:
    if not _is_number(value) or value <= 0:
        return "expected a number > 0"
    return None


def _non_negative_int(value: object) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return "expected an integer >= 0"
    return None


def _fail_status(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 400 <= value <= 599:
        return "expected null or an HTTP error status (400-599)"
    return None


def _fail_count(value: object) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or value < -1:
        return "expected an integer >= 0, or -1 for every call"
    return None


def _error_style(value: object) -> str | None:
    if value not in ERROR_STYLES:
        return f"expected one of {', '.join(ERROR_STYLES)}"
    return None


def _optional_email(value: object) -> str | None:
    if value is None or (isinstance(value, str) and "@" in value):
        return None
    return "expected null or an email address"


def _optional_http_url(value: object) -> str | None:
    if value is None or (isinstance(value, str) and is_absolute_http_url(value)):
        return None
    return "expected null or an absolute http(s) URL"


def _webhook_secret(value: object) -> str | None:
    if not isinstance(value, str) or not value.startswith(WEBHOOK_SECRET_PREFIX):
        return f"expected {WEBHOOK_SECRET_PREFIX} followed by the secret"
    if value == WEBHOOK_SECRET_PREFIX:
        return f"expected {WEBHOOK_SECRET_PREFIX} followed by the secret, not {value} alone"
    return None


_CHECKS: dict[str, Callable[[object], str | None]] = {
    "access_token_ttl_s": _positive_number,
    "code_ttl_s": _positive_number,
    "default_balance": _non_negative_int,
    "token_delay_s": _non_negative_number,
    "token_response_delay_s": _non_negative_number,
    "token_fail_status": _fail_status,
    "token_fail_count": _fail_count,
    "chunk_delay_s": _non_negative_number,
    "oauth_error_style": _error_style,
    "auto_approve_email": _optional_email,
    "webhook_url": _optional_http_url,
    "webhook_secret": _webhook_secret,
    "low_balance_threshold": _non_negative_int,
}
assert set(_CHECKS) == {f.name for f in dataclasses.fields(MockSettings)}
