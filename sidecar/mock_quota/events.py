"""The five events Quota sends an app's webhook, and the moment each one is sent.

    user.connected     a code exchange succeeded            {user_id, client_id, scope}
    user.disconnected  /oauth/revoke stopped a grant, or     {user_id, client_id}
                       the user disconnected the app in the
                       dashboard (/_mock/users/{id}/disconnect)
    balance.updated    a top-up was paid, or a wallet set   {user_id, balance}
    balance.low        a spend took the wallet from at      {user_id, balance, threshold}
                       least low_balance_threshold to below
    usage.completed    a billed call settled (chat or       {user_id, credits_used,
                       messages, plain, streamed or cut off) balance_after, model}

Billing decides its events in one place: ``on_settle`` is the hook a call's ``Reservation``
runs when it is settled, however the call ended. Every function here only starts a delivery
(``WebhookSender.emit``); none waits for the receiver.
"""

from __future__ import annotations

from .wallets import Reservation, SettleHook, user_id_for
from .webhooks import WebhookSender

EVENT_TYPES = (
    "user.connected",
    "user.disconnected",
    "balance.updated",
    "balance.low",
    "usage.completed",
)


def user_connected(sender: WebhookSender, user_id: str, client_id: str, scope: str) -> None:
    sender.emit("user.connected", {"user_id": user_id, "client_id": client_id, "scope": scope})


def user_disconnected(sender: WebhookSender, user_id: str, client_id: str) -> None:
    sender.emit("user.disconnected", {"user_id": user_id, "client_id": client_id})


def balance_updated(sender: WebhookSender, email: str, balance: int) -> None:
    sender.emit("balance.updated", {"user_id": user_id_for(email), "balance": balance})


def on_settle(sender: WebhookSender, model: str) -> SettleHook:
    """The hook a billed call's reservation runs once settled: usage, then a low balance."""

    def settled(reservation: Reservation, balance_after: int) -> None:
        user_id = user_id_for(reservation.email)
        sender.emit(
            "usage.completed",
            {
                "user_id": user_id,
                "credits_used": reservation.charged,
                "balance_after": balance_after,
                "model": model,
            },
        )
        threshold = sender.quota.settings.low_balance_threshold
        if reservation.balance_before >= threshold > balance_after:
            sender.emit(
                "balance.low",
                {"user_id": user_id, "balance": balance_after, "threshold": threshold},
            )

    return settled
