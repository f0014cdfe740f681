"""Keyring and sealing: AES-256-GCM for records at rest and for Redis.

Record format (bytes): ``0x01 | len(kid) | kid | nonce(12) | ciphertext+tag``.
The associated data binds a record to (kind, user_id, server_key), so a
ciphertext copied to another row does not decrypt. Redis blobs use the same
format, base64url-encoded, under the transport key, bound to a purpose
string (the Redis key they are stored under).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
from dataclasses import dataclass
from functools import cached_property

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import BrokerError, ConfigError

__all__ = [
    "FORMAT_VERSION",
    "DecryptError",
    "Keyring",
    "Sealer",
    "parse_master_keys",
    "parse_key",
    "generate_key_line",
    "record_ad",
    "ciphertext_kid",
]

FORMAT_VERSION = 1
NONCE_BYTES = 12
KEY_BYTES = 32
_KID_RE = re.compile(r"^[A-Za-z0-9._-]{1,32}$")


class DecryptError(BrokerError):
    """Raised when a blob cannot be opened: unknown key, tampered, wrong binding."""

    code = "decrypt_failed"
    default_message = "record could not be decrypted"


def record_ad(kind: str, user_id: str, server_key: str = "") -> bytes:
    """Associated data binding a record to its row; JSON keeps it unambiguous."""
    return json.dumps([FORMAT_VERSION, kind, user_id, server_key]).encode()


def parse_key(text: str, variable: str) -> bytes:
    """Decode one base64 key of exactly 32 bytes, naming the variable if not."""
    try:
        # Accept standard and URL-safe alphabets.
        norm = text.strip().replace("-", "+").replace("_", "/")
        raw = base64.b64decode(_pad(norm), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{variable}: key is not valid base64") from None
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"{variable}: key must be 32 bytes of base64, got {len(raw)} bytes")
    return raw


def _pad(text: str) -> str:
    return text + "=" * (-len(text) % 4)


def parse_master_keys(value: str, variable: str = "CREDBROKER_MASTER_KEYS") -> dict[str, bytes]:
    """Parse ``kid:base64,kid:base64``; order is kept, the first one encrypts."""
    keys: dict[str, bytes] = {}
    for position, item in enumerate(p.strip() for p in value.split(",")):
        if not item:
            continue
        kid, sep, b64 = item.partition(":")
        if not sep:
            raise ConfigError(f"{variable}: entry {position + 1} must be kid:base64key")
        if not _KID_RE.match(kid):
            raise ConfigError(
                f"{variable}: entry {position + 1} key id must be 1-32 of A-Z a-z 0-9 . _ -"
            )
        if kid in keys:
            raise ConfigError(f"{variable}: key id {kid!r} appears twice")
        keys[kid] = parse_key(b64, f"{variable} (key {kid!r})")
    if not keys:
        raise ConfigError(f"{variable}: no key given")
    return keys


def generate_key_line(kid: str | None = None) -> str:
    """A fresh ``kid:base64`` line for MASTER_KEYS."""
    kid = kid or "k" + secrets.token_hex(4)
    if not _KID_RE.match(kid):
        raise ConfigError("key id must be 1-32 of A-Z a-z 0-9 . _ -")
    return f"{kid}:{base64.b64encode(os.urandom(KEY_BYTES)).decode()}"


def ciphertext_kid(blob: bytes) -> str | None:
    """The key id a blob was sealed with, or None if it is not our format."""
    if len(blob) < 2 or blob[0] != FORMAT_VERSION:
        return None
    n = blob[1]
    if len(blob) < 2 + n:
        return None
    try:
        return blob[2 : 2 + n].decode("ascii")
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True, repr=False)
class Keyring:
    """Several AES-256 keys by id; the first encrypts, all decrypt."""

    keys: tuple[tuple[str, bytes], ...]

    @classmethod
    def from_mapping(cls, keys: dict[str, bytes]) -> Keyring:
        if not keys:
            raise ConfigError("a keyring needs at least one key")
        return cls(tuple(keys.items()))

    def __repr__(self) -> str:
        return f"Keyring(active={self.active_kid!r}, kids={list(self.kids)!r})"

    @property
    def active_kid(self) -> str:
        return self.keys[0][0]

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.keys)

    @cached_property
    def _aeads(self) -> dict[str, AESGCM]:
        # Built once: constructing an AESGCM per call cost as much as the decryption.
        aeads: dict[str, AESGCM] = {}
        for k, raw in self.keys:
            aeads.setdefault(k, AESGCM(raw))  # the first key with an id wins, as before
        return aeads

    def _aead(self, kid: str) -> AESGCM | None:
        return self._aeads.get(kid)

    def encrypt(self, plaintext: bytes, ad: bytes) -> bytes:
        kid = self.active_kid
        nonce = os.urandom(NONCE_BYTES)
        aead = self._aead(kid)
        assert aead is not None
        kid_bytes = kid.encode("ascii")
        return bytes([FORMAT_VERSION, len(kid_bytes)]) + kid_bytes + nonce + aead.encrypt(nonce, plaintext, ad)

    def decrypt(self, blob: bytes, ad: bytes) -> bytes:
        kid = ciphertext_kid(blob)
        if kid is None:
            raise DecryptError("record is not in a known format")
        aead = self._aead(kid)
        if aead is None:
            raise DecryptError(f"record was sealed with unknown key id {kid!r}")
        start = 2 + len(kid)
        nonce = blob[start : start + NONCE_BYTES]
        if len(nonce) != NONCE_BYTES:
            raise DecryptError("record is truncated")
        try:
            return aead.decrypt(nonce, blob[start + NONCE_BYTES :], ad)
        except InvalidTag:
            raise DecryptError("record failed authentication (tampered or bound to another row)") from None

    def derive(self, label: str) -> bytes:
        """A 32-byte subkey of the active key (see ``derive_ring`` for one per key)."""
        return _hkdf(self.keys[0][1], label)

    def derive_ring(self, label: str) -> Keyring:
        """A subkey of every key, under the same ids: the newest seals, all open.

        Each subkey depends only on its own master key, so a blob sealed before
        a rotation still opens after it in any process that holds that key.
        """
        return Keyring(tuple((kid, _hkdf(raw, label)) for kid, raw in self.keys))


def _hkdf(key: bytes, label: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=label.encode()).derive(key)


class Sealer:
    """Seals short-lived blobs that touch Redis, bound to their Redis key."""

    def __init__(self, key: bytes | Keyring, kid: str = "t", role: str = "transport") -> None:
        self._ring = key if isinstance(key, Keyring) else Keyring(((kid, key),))
        self.role = role

    def __repr__(self) -> str:
        return f"Sealer(<{self.role} key>)"

    def seal(self, data: bytes, purpose: str) -> str:
        return base64.urlsafe_b64encode(self._ring.encrypt(data, purpose.encode())).decode("ascii")

    def open(self, text: str | bytes, purpose: str) -> bytes:
        try:
            raw = base64.urlsafe_b64decode(text if isinstance(text, bytes) else text.encode("ascii"))
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise DecryptError("sealed blob is not base64") from None
        return self._ring.decrypt(raw, purpose.encode())

    def seal_json(self, obj: object, purpose: str) -> str:
        return self.seal(json.dumps(obj, separators=(",", ":")).encode(), purpose)

    def open_json(self, text: str | bytes, purpose: str) -> object:
        return json.loads(self.open(text, purpose))
