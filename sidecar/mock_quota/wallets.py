"""Users' credit wallets: balances, stable user ids, and the hold-then-settle billing Quota does.

Quota reserves a request's maximum cost before any output and settles to the actual cost when
the request ends. The emulator holds the reservation in the wallet for the duration, so two
concurrent streams cannot both spend the same credits:

    t0  stream A: balance 10_000, reserves 8_000  -> wallet shows 2_000
    t1  stream B: needs 8_000, sees 2_000          -> 402 insufficient_credits, nothing held
    t2  stream A ends, actual cost 3_000          -> settle refunds 5_000 -> wallet shows 7_000

A reservation may carry an ``on_settle`` hook, called once with the settled reservation and the
new balance: the one place where a billed call's consequences (its webhooks) are decided, however
the call ended.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

SettleHook = Callable[["Reservation", int], None]


def normalize_email(email: str) -> str:
    return email.strip().lower()


def user_id_for(email: str) -> str:
    """Quota's ``usr_…`` id for an account; stable for an email across runs."""
    digest = hashlib.sha256(normalize_email(email).encode()).hexdigest()
    return f"usr_{digest[:20]}"


class Reservation:
    """Credits held from one wallet until ``settle`` charges the actual cost."""

    def __init__(
        self,
        wallets: Wallets,
        email: str,
        amount: int,
        balance_before: int,
        on_settle: SettleHook | None = None,
    ) -> None:
        self._wallets = wallets
        self._on_settle = on_settle
        self.email = email
        self.amount = amount
        self.balance_before = balance_before
        self.charged: int | None = None

    def settle(self, actual: int) -> int:
        """Charge ``actual`` (capped at the hold), release the rest; returns the new balance."""
        if self.charged is not None:
            raise RuntimeError("reservation already settled")
        self.charged = max(0, min(actual, self.amount))
        balance = self._wallets.adjust(self.email, self.amount - self.charged)
        if self._on_settle is not None:
            self._on_settle(self, balance)
        return balance


class Wallets:
    """Balances by account email; a wallet is created with the default balance on first use."""

    def __init__(self, default_balance: Callable[[], int]) -> None:
        self._default_balance = default_balance
        self._balances: dict[str, int] = {}

    def balance(self, email: str) -> int:
        key = normalize_email(email)
        if key not in self._balances:
            self._balances[key] = self._default_balance()
        return self._balances[key]

    def set(self, email: str, balance: int) -> None:
        self._balances[normalize_email(email)] = balance

    def adjust(self, email: str, delta: int) -> int:
        balance = self.balance(email) + delta
        self._balances[normalize_email(email)] = balance
        return balance

    def reserve(
        self, email: str, amount: int, *, on_settle: SettleHook | None = None
    ) -> Reservation | None:
        """Hold ``amount`` credits, or return ``None`` (holding nothing) if the wallet is short."""
        before = self.balance(email)
        if before < amount:
            return None
        self.adjust(email, -amount)
        return Reservation(self, email, amount, before, on_settle)

    def to_json(self) -> dict[str, int]:
        return dict(sorted(self._balances.items()))
