"""Re-seal every stored token record under the primary key, while the sidecars keep serving.

The key ring is ``tokens.encryption_keys``: the first key seals, every key opens. To replace a
key without logging anyone out:

1. Add the new key FIRST in ``tokens.encryption_keys``, keeping the old one second, and roll
   the new configuration out to every replica. From then on every write (connect, refresh)
   seals under the new key, and records still under the old one keep opening.
2. Run ``quota-sidecar rotate-keys`` (with the same configuration) once the rollout is
   complete. It re-seals every record still under the old key; ``--dry-run`` only counts.
3. When the report says nothing is left (0 re-sealed on a rerun, 0 busy), remove the old key
   and roll out again. A record under a key no longer in the ring no longer opens: its user has
   to connect their wallet again.

Run step 2 only after step 1 has reached every replica: a replica still on the old ring seals
its refreshes under the old key again, and only a second run after the rollout moves those.
Note: when ``encryption_keys`` is empty the one key is derived from ``session.secret``, and the
configuration cannot name that derived key; so the first move to explicit keys is not a
rotation (records sealed under the derived key stop opening once explicit keys are set).

Safe while replicas serve traffic: nothing is locked, and each record is rewritten with a
compare-and-set on its version that keeps the version (see ``sidecar.tokens.redis_store``), so
a refresh in flight on another replica still writes its tokens::

    rotate-keys: seal_state → older key; reseal: read v1 … write b (same tokens, new key), v1 kept
    replica A:   (read v1 before, token call in flight) … CAS(v1 → v2) ✓

and when a refresh lands between the re-seal's read and its write, the re-seal writes nothing
and looks again: the refresh has already sealed under the new key. Records are visited one at a
time (one round trip for a record already under the new key, three for one re-sealed), so the
load on Redis stays that of one more client.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sidecar.tokens.store import SealState, TokenStore

log = logging.getLogger(__name__)

# A record rewritten by refreshes this many times in a row while we try is left for a rerun.
RESEAL_ATTEMPTS = 3


@dataclass(slots=True)
class RotateReport:
    """What ``rotate_keys`` found; every scanned record is counted in exactly one other field."""

    dry_run: bool = False
    scanned: int = 0
    resealed: int = 0  # re-sealed under the primary key (in a dry run: would be)
    already_primary: int = 0
    unreadable: int = 0  # opens under no key of the ring: left as is (and logged)
    gone: int = 0  # deleted between the scan and the re-seal (a disconnect)
    busy: int = 0  # kept changing under the old key: a replica on the old ring? run again

    def summary(self) -> str:
        resealed = "would be re-sealed" if self.dry_run else "re-sealed"
        return (
            f"scanned {self.scanned} token record(s): {self.resealed} {resealed} under the "
            f"primary key, {self.already_primary} already under it, {self.unreadable} "
            f"unreadable (left as is), {self.gone} gone meanwhile, {self.busy} busy"
        )


async def rotate_keys(store: TokenStore, *, dry_run: bool = False) -> RotateReport:
    """Re-seal, under the primary key, every record ``store`` holds under another key of its ring.

    Raises ``StoreUnavailable`` if the store goes away; what was re-sealed until then stays so,
    and running again is safe (records already under the primary key are only counted).
    """
    report = RotateReport(dry_run=dry_run)
    async for user_key in store.scan_user_keys():
        report.scanned += 1
        await _rotate_one(store, user_key, report)
    log.info("key rotation: %s", report.summary())
    return report


async def _rotate_one(store: TokenStore, user_key: str, report: RotateReport) -> None:
    for _ in range(RESEAL_ATTEMPTS):
        state = await store.seal_state(user_key)
        if state is SealState.PRIMARY:
            report.already_primary += 1
            return
        if state is SealState.UNREADABLE:
            log.warning(
                "token record for user key %s… opens under no key of the ring", user_key[:12]
            )
            report.unreadable += 1
            return
        if state is SealState.ABSENT:
            report.gone += 1
            return
        if report.dry_run or await store.reseal(user_key):
            report.resealed += 1
            return
        # Changed between reseal's read and its write (a refresh or a reconnect): look again.
    report.busy += 1
