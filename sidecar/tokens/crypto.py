"""Key derivation, user-key hashing and authenticated sealing of token records.

Three pieces, all keyed by secrets the operator holds:

* ``derive_key`` turns one master secret into independent keys with HKDF-SHA256, one per label
  (``quota-sidecar/v1/token-seal``, ``…/user-key``, ``…/session-cookie``), so a key leaked from
  one use does not open another.
* ``UserKeys`` maps a host app's user id to ``user_key``, a keyed HMAC: the only form a user id
  takes in any store, so a Redis dump names no one.
* ``Sealer`` encrypts a record with AES-256-GCM, bound to its ``user_key`` through the associated
  data, so a blob copied under another user's key does not open.

Sealed blob layout (all fields fixed width except the last)::

    format (1) | key id (4) | nonce (12) | ciphertext + GCM tag (>= 16)

The key id is the first 4 bytes of SHA-256 of the key: it names the key without revealing it, and
lets ``open`` go straight to the right key of the ring. The first key of the ring seals, every key
opens, so keys rotate without downtime: deploy ``[new, old]``, let records be rewritten (every
refresh re-seals), then drop ``old``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sidecar.tokens.model import TokenRecord

HKDF_SALT = b"quota-sidecar"
SEAL_KEY_BYTES = 32  # AES-256
USER_KEY_MIN_BYTES = 16  # an HMAC key shorter than this is guessable

_FORMAT_V1 = b"\x01"
_KEY_ID_BYTES = 4
_NONCE_BYTES = 12  # 96 bits, the GCM standard nonce
_TAG_BYTES = 16
_HEADER_BYTES = len(_FORMAT_V1) + _KEY_ID_BYTES + _NONCE_BYTES
_AAD_PREFIX = b"quota-sidecar/v1/tokens|"


def derive_key(secret: bytes, label: str, length: int = 32) -> bytes:
    """A key of ``length`` bytes for one purpose (``label``), derived from ``secret``."""
    if not secret:
        raise ValueError("derive_key needs a non-empty secret")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=HKDF_SALT, info=label.encode())
    return hkdf.derive(secret)


class UserKeys:
    """Turns a host app's user id into the opaque ``user_key`` stores are addressed by."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < USER_KEY_MIN_BYTES:
            raise ValueError(f"the user-key HMAC key must be at least {USER_KEY_MIN_BYTES} bytes")
        self._key = key

    def key_for(self, user_id: str) -> str:
        """Hex HMAC-SHA256 of the user id: 64 characters, stable for a given key."""
        return hmac.new(self._key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        return "UserKeys(key='***')"


class SealError(Exception):
    """A blob did not open. The message says why; it never holds a key or any plaintext."""


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:_KEY_ID_BYTES]


def _associated_data(user_key: str) -> bytes:
    return _AAD_PREFIX + user_key.encode("utf-8")


class Sealer:
    """Seals and opens token records with a ring of AES-256-GCM keys."""

    __slots__ = ("_by_id", "_primary", "_primary_id")

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("the sealing key ring is empty; give at least one 32-byte key")
        for position, key in enumerate(keys):
            if len(key) != SEAL_KEY_BYTES:
                raise ValueError(
                    f"sealing key #{position} is {len(key)} bytes; each must be {SEAL_KEY_BYTES}"
                )
        # Built once: AESGCM objects are reused on every seal and open (the hot path).
        # Several keys may share a 4-byte id (unlikely, but not impossible); open tries each.
        self._by_id: dict[bytes, list[AESGCM]] = {}
        for key in keys:
            self._by_id.setdefault(_key_id(key), []).append(AESGCM(key))
        self._primary_id = _key_id(keys[0])
        self._primary = self._by_id[self._primary_id][0]

    @property
    def primary_key_id(self) -> str:
        """Hex id of the key new seals use."""
        return self._primary_id.hex()

    def seal(self, user_key: str, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext`` for ``user_key`` with the primary key and a fresh nonce."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        ciphertext = self._primary.encrypt(nonce, plaintext, _associated_data(user_key))
        return _FORMAT_V1 + self._primary_id + nonce + ciphertext

    def open(self, user_key: str, blob: bytes) -> bytes:
        """The plaintext sealed in ``blob`` for ``user_key``; ``SealError`` if it does not open."""
        if len(blob) < _HEADER_BYTES + _TAG_BYTES:
            raise SealError(f"sealed blob is too short ({len(blob)} bytes)")
        if blob[:1] != _FORMAT_V1:
            raise SealError(f"sealed blob has an unknown format byte 0x{blob[0]:02x}")
        key_id = blob[1 : 1 + _KEY_ID_BYTES]
        candidates = self._by_id.get(key_id)
        if candidates is None:
            raise SealError(f"sealed with key id {key_id.hex()}, which is not in the key ring")
        nonce = blob[1 + _KEY_ID_BYTES : _HEADER_BYTES]
        ciphertext = blob[_HEADER_BYTES:]
        aad = _associated_data(user_key)
        for aead in candidates:
            try:
                return aead.decrypt(nonce, ciphertext, aad)
            except InvalidTag:
                continue
        raise SealError(
            "sealed blob failed authentication: altered, or sealed for another user key"
        )

    def key_id_of(self, blob: bytes) -> str | None:
        """Hex id of the key that sealed ``blob``, or ``None`` if it is not a sealed blob."""
        if len(blob) < _HEADER_BYTES + _TAG_BYTES or blob[:1] != _FORMAT_V1:
            return None
        return blob[1 : 1 + _KEY_ID_BYTES].hex()

    def seal_record(self, user_key: str, record: TokenRecord) -> bytes:
        """Seal the record's payload (not its version, which the store keeps beside it)."""
        payload = json.dumps(record.to_json(), separators=(",", ":"), sort_keys=True)
        return self.seal(user_key, payload.encode("utf-8"))

    def open_record(self, user_key: str, blob: bytes, *, version: int) -> TokenRecord:
        """The record sealed in ``blob``, carrying ``version``; ``SealError`` if unreadable."""
        plaintext = self.open(user_key, blob)
        try:
            data = json.loads(plaintext)
            if not isinstance(data, dict):
                raise TypeError("payload is not a JSON object")
            return TokenRecord.from_json(data, version=version)
        except (ValueError, KeyError, TypeError) as exc:
            # Name the failure kind only: the exception text could quote the plaintext.
            raise SealError(
                f"sealed payload is not a token record ({type(exc).__name__})"
            ) from None

    def __repr__(self) -> str:
        ids = ", ".join(key_id.hex() for key_id in self._by_id)
        return f"Sealer(primary={self.primary_key_id}, key_ids=[{ids}])"
