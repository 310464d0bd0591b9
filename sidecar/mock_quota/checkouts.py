"""What a user can buy and the checkout sessions that buy it: packages, sessions, their states.

A checkout session belongs to the user whose access token created it: paying credits *that*
user's wallet, whoever opens the page (as with a Stripe link). A session is paid or canceled at
most once; after ``CHECKOUT_TTL_S`` it can no longer be paid.

    open --pay--> paid         (credits added once; a second pay is refused)
    open --cancel--> canceled  (nothing added; pay is refused, cancel may be repeated)
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

# Stripe's default lifetime for a checkout session.
CHECKOUT_TTL_S = 24 * 3600

CheckoutStatus = Literal["open", "paid", "canceled"]


@dataclass(frozen=True)
class Package:
    """A bundle of credits for a price; 1,000,000 credits = $1, less in the larger packages."""

    id: str
    name: str
    credits: int
    price_cents: int
    currency: str = "usd"

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "credits": self.credits,
            "price_cents": self.price_cents,
            "currency": self.currency,
        }

    @property
    def price(self) -> str:
        """The price as a person reads it: ``$5.00``."""
        return f"${self.price_cents // 100}.{self.price_cents % 100:02d}"


PACKAGES: tuple[Package, ...] = (
    Package("pkg_starter", "Starter", 5_000_000, 500),
    Package("pkg_pro", "Pro", 25_000_000, 2_000),
    Package("pkg_scale", "Scale", 100_000_000, 7_000),
)


def find_package(package_id: str) -> Package | None:
    return next((p for p in PACKAGES if p.id == package_id), None)


@dataclass
class Checkout:
    id: str
    package: Package
    email: str
    client_id: str
    success_url: str
    cancel_url: str
    created_at: float
    expires_at: float
    status: CheckoutStatus = "open"


class CheckoutBook:
    """Every checkout session the emulator has created, with the clock that expires them."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.sessions: dict[str, Checkout] = {}

    def create(
        self, *, package: Package, email: str, client_id: str, success_url: str, cancel_url: str
    ) -> Checkout:
        now = self._clock()
        checkout = Checkout(
            id=f"cs_{secrets.token_hex(16)}",
            package=package,
            email=email,
            client_id=client_id,
            success_url=success_url,
            cancel_url=cancel_url,
            created_at=now,
            expires_at=now + CHECKOUT_TTL_S,
        )
        self.sessions[checkout.id] = checkout
        return checkout

    def get(self, checkout_id: str) -> Checkout | None:
        return self.sessions.get(checkout_id)

    def expired(self, checkout: Checkout) -> bool:
        return self._clock() >= checkout.expires_at
