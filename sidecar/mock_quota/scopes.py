"""The scopes Quota knows, what each one lets an app do, and how scope strings are parsed."""

from __future__ import annotations

from collections.abc import Iterable

# Quota's documented scopes, each with the sentence the consent page shows.
SCOPE_DESCRIPTIONS: dict[str, str] = {
    "openid": "Confirm your Quota identity",
    "profile": "See your Quota profile (name and picture)",
    "email": "See the email address of your Quota account",
    "credits.read": "See your credit balance and the models you can use",
    "credits.spend": "Spend credits from your wallet on AI requests",
    "account.read": "See your Quota account settings",
    "account.write": "Change your Quota account settings",
    "apps.read": "See the apps registered under your developer account",
    "apps.write": "Register and change apps under your developer account",
}
KNOWN_SCOPES: tuple[str, ...] = tuple(SCOPE_DESCRIPTIONS)

CREDITS_READ = "credits.read"
CREDITS_SPEND = "credits.spend"


def parse_scope(scope: str | None) -> tuple[str, ...]:
    """Split a space-separated scope string, dropping repeats and keeping the first order."""
    return tuple(dict.fromkeys((scope or "").split()))


def format_scope(scopes: Iterable[str]) -> str:
    return " ".join(scopes)


def describe(scope: str) -> str:
    return SCOPE_DESCRIPTIONS.get(scope, scope)
