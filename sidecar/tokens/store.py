"""The token store contract: what every backend (memory, Redis) promises the refresh logic.

Records are addressed by ``user_key`` — an HMAC of the host app's user id (see
``sidecar.tokens.crypto.UserKeys``) — so no raw user id ever reaches a backend. Backends seal
records with the ``Sealer`` they are given, bound to the ``user_key``.

Every method raises ``sidecar.errors.StoreUnavailable`` when the backend cannot be reached; it
never deletes or changes anything on that path. A record that no longer opens (wrong key,
tampered, copied from another user) is treated as absent by ``get`` and logged.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from sidecar.tokens.model import TokenRecord


@runtime_checkable
class TokenStore(Protocol):
    """Compare-and-set storage for one record per user.

    Versions: every successful write gives the record a new ``version`` that this user's key has
    never had before (not merely ``old + 1``: a delete followed by a put must not recreate an
    old version, or a refresh that started before a disconnect could write its tokens back).
    """

    name: str

    async def get(self, user_key: str) -> TokenRecord | None:
        """The current record with its ``version``, or ``None``."""
        ...

    async def put(self, user_key: str, record: TokenRecord) -> TokenRecord:
        """Write unconditionally (a new connection). Returns the record with its new version."""
        ...

    async def compare_and_set(
        self, user_key: str, expected_version: int, record: TokenRecord
    ) -> TokenRecord | None:
        """Write only if the stored version is ``expected_version``.

        Returns the written record with its new version, or ``None`` when the record changed or
        is gone (nothing written).
        """
        ...

    async def delete(self, user_key: str) -> bool:
        """Delete whatever is stored. True if something was deleted."""
        ...

    async def compare_and_delete(self, user_key: str, expected_version: int) -> bool:
        """Delete only if the stored version is ``expected_version``. True if deleted."""
        ...

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the backend answers."""
        ...

    async def close(self) -> None: ...
