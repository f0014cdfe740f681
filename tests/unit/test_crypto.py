"""Keyring and sealing: AES-256-GCM, key ids, associated data."""

from __future__ import annotations

import base64
import os

import pytest

from broker.crypto import (
    DecryptError,
    Keyring,
    Sealer,
    ciphertext_kid,
    generate_key_line,
    parse_master_keys,
    record_ad,
)
from broker.errors import ConfigError
from tests.conftest import key_line, make_keyring
from tests.secrets import canary


def test_round_trip_and_fresh_nonce() -> None:
    ring = make_keyring("a")
    secret = canary("crypto").encode()
    ad = record_ad("credential", "alice", "k1")
    one, two = ring.encrypt(secret, ad), ring.encrypt(secret, ad)
    assert one != two  # a fresh nonce per record
    assert ring.decrypt(one, ad) == secret == ring.decrypt(two, ad)
    assert secret not in one


def test_format_carries_version_and_key_id() -> None:
    ring = make_keyring("key-2026")
    blob = ring.encrypt(b"x", b"ad")
    assert blob[0] == 1
    assert ciphertext_kid(blob) == "key-2026"


def test_associated_data_binds_the_row() -> None:
    ring = make_keyring("a")
    blob = ring.encrypt(b"token", record_ad("credential", "alice", "k1"))
    for other in (record_ad("credential", "bob", "k1"), record_ad("credential", "alice", "k2"),
                  record_ad("subject_token", "alice", "k1")):
        with pytest.raises(DecryptError):
            ring.decrypt(blob, other)


def test_ad_is_unambiguous_for_separator_characters() -> None:
    assert record_ad("credential", "a:b", "c") != record_ad("credential", "a", "b:c")
    assert record_ad("credential", 'a", "b', "c") != record_ad("credential", "a", 'b", "c')


def test_every_flipped_byte_is_rejected() -> None:
    ring = make_keyring("a")
    blob = ring.encrypt(b"token-value", b"ad")
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        with pytest.raises(DecryptError):
            ring.decrypt(bytes(tampered), b"ad")


def test_newest_key_encrypts_all_decrypt() -> None:
    a = os.urandom(32)
    b = os.urandom(32)
    old = Keyring((("A", a),))
    blob_a = old.encrypt(b"v", b"ad")
    rotated = Keyring((("B", b), ("A", a)))
    assert rotated.decrypt(blob_a, b"ad") == b"v"
    assert ciphertext_kid(rotated.encrypt(b"v", b"ad")) == "B"
    with pytest.raises(DecryptError, match="unknown key id"):
        Keyring((("B", b),)).decrypt(blob_a, b"ad")


def test_parse_master_keys_and_generate() -> None:
    line = generate_key_line("k1")
    kid, _, b64 = line.partition(":")
    assert kid == "k1" and len(base64.b64decode(b64)) == 32
    keys = parse_master_keys(f"{line},{key_line('k0', os.urandom(32))}")
    assert list(keys) == ["k1", "k0"]


@pytest.mark.parametrize(
    "value, message",
    [
        ("k1", "kid:base64key"),
        ("k1:not base64!!", "not valid base64"),
        ("k1:" + base64.b64encode(b"short").decode(), "32 bytes"),
        ("bad id!:" + base64.b64encode(os.urandom(32)).decode(), "key id"),
        ("", "no key"),
    ],
)
def test_malformed_master_keys_name_the_variable(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_master_keys(value)
    assert "CREDBROKER_MASTER_KEYS" in str(info.value)


def test_malformed_key_message_holds_no_key_material() -> None:
    material = base64.b64encode(os.urandom(31)).decode()
    with pytest.raises(ConfigError) as info:
        parse_master_keys(f"k1:{material}")
    assert material not in str(info.value)


def test_repr_hides_keys() -> None:
    raw = os.urandom(32)
    ring = Keyring((("A", raw),))
    assert base64.b64encode(raw).decode() not in repr(ring)
    assert repr(raw) not in repr(ring)


def test_sealer_binds_purpose_and_rejects_garbage() -> None:
    sealer = Sealer(os.urandom(32))
    token = canary("sealed")
    blob = sealer.seal_json({"t": token}, "cache:alice:srv")
    assert token not in blob
    assert sealer.open_json(blob, "cache:alice:srv") == {"t": token}
    with pytest.raises(DecryptError):
        sealer.open_json(blob, "cache:bob:srv")
    with pytest.raises(DecryptError):
        sealer.open("%%%not-base64", "x")
    with pytest.raises(DecryptError):
        Sealer(os.urandom(32)).open(blob, "cache:alice:srv")
