"""Key derivation, user keys and sealing: round trips, tampering, key rotation, separation."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import pytest

from sidecar.tokens.crypto import Sealer, SealError, UserKeys, derive_key
from sidecar.tokens.model import TokenRecord

MakeSealer = Callable[..., Sealer]

USER = "a" * 64
OTHER_USER = "b" * 64
LABELS = (
    "quota-sidecar/v1/token-seal",
    "quota-sidecar/v1/user-key",
    "quota-sidecar/v1/session-cookie",
)

# Offsets into a sealed blob: format (1) | key id (4) | nonce (12) | ciphertext + tag.
BLOB_REGIONS = {
    "format byte": 0,
    "key id": 1,
    "nonce": 5,
    "ciphertext": 17,
    "tag": -1,
}


def make_record(**overrides: object) -> TokenRecord:
    fields: dict[str, object] = {
        "access_token": "at-" + secrets.token_urlsafe(16),
        "refresh_token": "rt-" + secrets.token_urlsafe(16),
        "expires_at": 1_900_000_000.5,
        "scope": "chat models:read",
        "obtained_at": 1_899_999_000.25,
    }
    fields.update(overrides)
    return TokenRecord(**fields)  # type: ignore[arg-type]


def new_key() -> bytes:
    return secrets.token_bytes(32)


def test_sealed_bytes_open_to_the_same_plaintext(make_sealer: MakeSealer) -> None:
    sealer = make_sealer()
    assert sealer.open(USER, sealer.seal(USER, b"hello tokens")) == b"hello tokens"


def test_sealed_record_opens_with_every_field_and_the_given_version(
    make_sealer: MakeSealer,
) -> None:
    sealer = make_sealer()
    record = make_record()
    opened = sealer.open_record(USER, sealer.seal_record(USER, record), version=42)
    assert opened == record.with_version(42)


def test_sealed_record_does_not_contain_the_tokens(make_sealer: MakeSealer) -> None:
    sealer = make_sealer()
    record = make_record()
    blob = sealer.seal_record(USER, record)
    assert record.access_token.encode() not in blob
    assert record.refresh_token.encode() not in blob


@pytest.mark.parametrize("offset", BLOB_REGIONS.values(), ids=BLOB_REGIONS.keys())
def test_open_rejects_a_blob_with_any_byte_flipped(make_sealer: MakeSealer, offset: int) -> None:
    sealer = make_sealer()
    blob = bytearray(sealer.seal(USER, b"secret payload"))
    blob[offset] ^= 0x01
    with pytest.raises(SealError):
        sealer.open(USER, bytes(blob))


@pytest.mark.parametrize("length", [0, 1, 17, 32])
def test_open_rejects_a_truncated_blob(make_sealer: MakeSealer, length: int) -> None:
    sealer = make_sealer()
    blob = sealer.seal(USER, b"secret payload")
    with pytest.raises(SealError):
        sealer.open(USER, blob[:length])


def test_open_rejects_a_blob_sealed_for_another_user(make_sealer: MakeSealer) -> None:
    sealer = make_sealer()
    blob = sealer.seal(USER, b"secret payload")
    with pytest.raises(SealError):
        sealer.open(OTHER_USER, blob)


def test_open_record_rejects_a_payload_that_is_not_a_record(make_sealer: MakeSealer) -> None:
    sealer = make_sealer()
    for payload in (b"not json", b"[1, 2]", b'{"access_token": "x"}'):
        with pytest.raises(SealError):
            sealer.open_record(USER, sealer.seal(USER, payload), version=1)


def test_seal_error_messages_contain_no_key_and_no_plaintext(make_sealer: MakeSealer) -> None:
    key = new_key()
    sealer = make_sealer([key])
    record = make_record()
    blob = bytearray(sealer.seal_record(USER, record))
    blob[-1] ^= 0x01
    with pytest.raises(SealError) as caught:
        sealer.open_record(USER, bytes(blob), version=1)
    message = str(caught.value)
    for secret in (key.hex(), record.access_token, record.refresh_token):
        assert secret not in message
    with pytest.raises(SealError) as caught:
        sealer.open_record(USER, sealer.seal(USER, b'{"access_token": "at-leak"}'), version=1)
    assert "at-leak" not in str(caught.value)


def test_record_sealed_under_the_old_key_opens_after_rotation(make_sealer: MakeSealer) -> None:
    old, new = new_key(), new_key()
    before = make_sealer([old])
    record = make_record()
    blob = before.seal_record(USER, record)

    after = make_sealer([new, old])

    assert after.open_record(USER, blob, version=7) == record.with_version(7)
    assert after.key_id_of(blob) == before.primary_key_id


def test_new_seals_after_rotation_use_the_new_key(make_sealer: MakeSealer) -> None:
    old, new = new_key(), new_key()
    ring = make_sealer([new, old])
    blob = ring.seal_record(USER, make_record())
    assert ring.key_id_of(blob) == ring.primary_key_id == make_sealer([new]).primary_key_id
    assert ring.primary_key_id != make_sealer([old]).primary_key_id


def test_record_sealed_under_a_removed_key_no_longer_opens(make_sealer: MakeSealer) -> None:
    old, new = new_key(), new_key()
    blob = make_sealer([old]).seal_record(USER, make_record())
    with pytest.raises(SealError):
        make_sealer([new]).open_record(USER, blob, version=1)


def test_key_id_of_is_none_for_bytes_that_are_not_a_sealed_blob(make_sealer: MakeSealer) -> None:
    sealer = make_sealer()
    assert sealer.key_id_of(b"") is None
    assert sealer.key_id_of(b"\x02" + sealer.seal(USER, b"x")[1:]) is None


def test_two_seals_of_the_same_plaintext_use_different_nonces(make_sealer: MakeSealer) -> None:
    sealer = make_sealer()
    first, second = sealer.seal(USER, b"same"), sealer.seal(USER, b"same")
    assert first[5:17] != second[5:17]
    assert first != second


def test_sealer_rejects_an_empty_key_ring() -> None:
    with pytest.raises(ValueError, match="empty"):
        Sealer([])


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_sealer_rejects_a_key_that_is_not_32_bytes(length: int) -> None:
    with pytest.raises(ValueError, match="32"):
        Sealer([new_key(), secrets.token_bytes(length)])


def test_sealer_repr_shows_key_ids_not_keys() -> None:
    key = new_key()
    assert key.hex() not in repr(Sealer([key]))


def test_derive_key_is_deterministic() -> None:
    secret = secrets.token_bytes(32)
    assert derive_key(secret, LABELS[0]) == derive_key(secret, LABELS[0])
    assert len(derive_key(secret, LABELS[0])) == 32
    assert len(derive_key(secret, LABELS[0], length=64)) == 64


def test_derive_key_gives_each_label_its_own_key() -> None:
    secret = secrets.token_bytes(32)
    keys = {derive_key(secret, label) for label in LABELS}
    assert len(keys) == len(LABELS)
    assert secret not in keys


def test_derive_key_depends_on_the_secret() -> None:
    assert derive_key(b"secret one", LABELS[0]) != derive_key(b"secret two", LABELS[0])


def test_derive_key_rejects_an_empty_secret() -> None:
    with pytest.raises(ValueError, match="secret"):
        derive_key(b"", LABELS[0])


def test_user_keys_are_deterministic_hex_of_64_characters() -> None:
    key = new_key()
    user_key = UserKeys(key).key_for("alice@example.com")
    assert user_key == UserKeys(key).key_for("alice@example.com")
    assert len(user_key) == 64
    assert all(char in "0123456789abcdef" for char in user_key)


def test_user_keys_differ_for_distinct_ids_and_distinct_keys() -> None:
    keys = UserKeys(new_key())
    ids = ["alice", "Alice", "alice ", "bob", "ünïcode-user", "42"]
    assert len({keys.key_for(user_id) for user_id in ids}) == len(ids)
    assert UserKeys(new_key()).key_for("alice") != keys.key_for("alice")


def test_user_key_does_not_contain_the_raw_id() -> None:
    user_id = "deadbeef"  # hex-looking, so it could hide in a hex digest by construction
    assert user_id not in UserKeys(new_key()).key_for(user_id)


def test_user_keys_reject_a_short_hmac_key() -> None:
    with pytest.raises(ValueError, match="16"):
        UserKeys(b"short")
