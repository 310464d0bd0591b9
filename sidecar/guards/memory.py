"""The guards' counts kept in this process: for the memory token store (one replica).

Admission and settlement run without an ``await`` in between their reads and writes, so on the
one event loop they are atomic: six calls racing for two slots get exactly two.

Memory stays bounded by the users active now: a user's set of open calls is dropped when it
empties, and spend entries of past windows are swept once per window.
"""

from __future__ import annotations

from collections.abc import Callable

from sidecar.guards.base import Limits, spend_limit_reached, too_many_streams, window_start
from sidecar.metrics import Metrics


class MemoryUserGuards:
    name = "memory"

    def __init__(self, limits: Limits, *, clock: Callable[[], float], metrics: Metrics) -> None:
        self.limits = limits
        self._clock = clock
        self._metrics = metrics
        self._open: dict[str, set[str]] = {}
        self._spent: dict[str, tuple[int, int]] = {}  # user_key -> (window start, credits)
        self._swept_window = -1

    async def admit(self, user_key: str, call_id: str, *, billed: bool) -> bool:
        limits = self.limits
        if billed and limits.spend_limit:
            now = self._clock()
            spent = self._spent_in(user_key, window_start(now, limits.spend_period_s))
            if spent >= limits.spend_limit:
                self._metrics.guard_rejected("spend_limit_reached")
                raise spend_limit_reached(limits, spent, now)
        if not limits.max_streams:
            return False
        calls = self._open.setdefault(user_key, set())
        if len(calls) >= limits.max_streams:
            self._metrics.guard_rejected("too_many_streams")
            raise too_many_streams(limits, len(calls))
        calls.add(call_id)
        return True

    async def settle(self, user_key: str, call_id: str, *, slot: bool, credits_used: int) -> None:
        if slot:
            calls = self._open.get(user_key)
            if calls is not None:
                calls.discard(call_id)
                if not calls:
                    del self._open[user_key]
        if credits_used > 0 and self.limits.spend_limit:
            window = window_start(self._clock(), self.limits.spend_period_s)
            self._sweep(window)
            self._spent[user_key] = (window, self._spent_in(user_key, window) + credits_used)

    async def close(self) -> None:
        self._open.clear()

    def open_calls(self, user_key: str) -> int:
        return len(self._open.get(user_key, ()))

    def _spent_in(self, user_key: str, window: int) -> int:
        started, credits = self._spent.get(user_key, (window, 0))
        return credits if started == window else 0

    def _sweep(self, window: int) -> None:
        if window != self._swept_window:
            self._swept_window = window
            self._spent = {k: v for k, v in self._spent.items() if v[0] == window}
