"""The guards' contract: admit a call before it goes to Quota, settle it when it ends.

A call is *admitted* (``admit``) before anything is sent to Quota: the spend guard refuses a
billed call once the user's spend in the current window has reached the limit
(``SpendLimitReached``), then the streams guard takes one of the user's slots or refuses
(``TooManyStreams``). When the call ends — answered, failed, or cut off by the client — it is
*settled* (``settle``): its slot is given back and the credits Quota reported are added to the
window.

Spend is checked before the call and counted after it, so the limit is a floor, not a ceiling::

    limit 1000, spent 990
    call A: admit (990 < 1000) ✓ …………………………… settle +40 → 1030
    call B: admit (990 < 1000) ✓ ………… settle +25 → 1055
    call C:                                    admit (1055 ≥ 1000) → 429

A call in flight overshoots by its own cost, and calls admitted together each may (at most
``max_concurrent_streams_per_user`` of them, when that guard is on). A call whose usage could not
be read (a stream the client cut off before Quota's ``quota`` block, a compressed or audio
answer) counts for nothing.

Store failures fail *open*: the call goes through unguarded, with a warning and
``quota_sidecar_guard_errors_total``. The guards protect wallets from a runaway client and Quota
from fan-out; they are not what keeps the service correct, and Quota still refuses what a wallet
cannot pay (402). Failing closed would turn a Redis blip into refused AI calls for everyone —
and when Redis holds the tokens too, the token read already answers 503 on its own.

Windows are fixed and aligned to the Unix epoch (``window_start``), the same on every replica
without coordination; ``Retry-After`` on a spend refusal is the time to the window's end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from sidecar.config import GuardsConfig
from sidecar.errors import SpendLimitReached, TooManyStreams


@dataclass(frozen=True, slots=True)
class Limits:
    max_streams: int  # 0: no limit
    spend_limit: int  # credits per window; 0: no limit
    spend_period_s: int
    lease_ttl_s: float

    @classmethod
    def of(cls, config: GuardsConfig) -> Limits:
        return cls(
            max_streams=config.max_concurrent_streams_per_user,
            spend_limit=config.spend_limit_credits,
            spend_period_s=config.spend_period_s,
            lease_ttl_s=config.stream_lease_ttl_s,
        )

    @property
    def any(self) -> bool:
        return bool(self.max_streams or self.spend_limit)


def window_start(now: float, period_s: int) -> int:
    """The start of the fixed window holding ``now`` (Unix seconds)."""
    return int(now // period_s) * period_s


def seconds_left(now: float, period_s: int) -> int:
    """Whole seconds until the window holding ``now`` ends, at least 1 (for ``Retry-After``)."""
    return max(1, math.ceil(window_start(now, period_s) + period_s - now))


def describe_period(period_s: int) -> str:
    """``per day``, ``per hour``, ``every 600 seconds``: the window in a person's words."""
    names = {86400: "per day", 3600: "per hour", 60: "per minute", 604800: "per week"}
    return names.get(period_s, f"every {period_s} seconds")


def too_many_streams(limits: Limits, open_calls: int) -> TooManyStreams:
    return TooManyStreams(limits.max_streams, detail=f"{open_calls} open")


def spend_limit_reached(limits: Limits, spent: int, now: float) -> SpendLimitReached:
    return SpendLimitReached(
        limits.spend_limit,
        describe_period(limits.spend_period_s),
        seconds_left(now, limits.spend_period_s),
        detail=f"{spent} credits spent in this window",
    )


class UserGuards(Protocol):
    """Counts per user (``user_key``, an HMAC of the user id: never the id itself)."""

    name: str
    limits: Limits

    async def admit(self, user_key: str, call_id: str, *, billed: bool) -> bool:
        """Check the spend (``billed`` calls only), then take a stream slot for ``call_id``.

        Returns whether a slot was taken (it must then be given back by ``settle``). Raises
        ``SpendLimitReached`` or ``TooManyStreams``; never ``StoreUnavailable`` (fails open).
        """
        ...

    async def settle(self, user_key: str, call_id: str, *, slot: bool, credits_used: int) -> None:
        """Give the slot back (if ``slot``) and add ``credits_used`` to the current window.

        Completes even when the caller is cancelled meanwhile (a client that left); never raises.
        """
        ...

    async def close(self) -> None:
        """Stop background work and wait for settlements in flight."""
        ...
