"""Compact JWS signing (RS256, ES256) and JWKs, on ``cryptography`` alone.

Just what the broker sends: client assertions (RFC 7523) and DPoP proofs
(RFC 9449). It signs; it never verifies anything it receives, so there is no
``alg`` negotiation to get wrong. Key material lives in ``SigningKey``, whose
``repr`` shows the algorithm and key id only.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from .errors import ConfigError

__all__ = [
    "ALGORITHMS",
    "SigningKey",
    "b64url",
    "generate_private_key",
    "load_private_pem",
    "private_pem",
    "public_jwk",
    "jwk_thumbprint",
    "sign_jws",
]

ALGORITHMS = ("ES256", "RS256")
_MIN_RSA_BITS = 2048


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64url_int(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url(value.to_bytes(size, "big"))


def _segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _alg_for(key: PrivateKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ConfigError("EC keys must be on curve P-256 (ES256)")
        return "ES256"
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ConfigError(f"RSA keys must have at least {_MIN_RSA_BITS} bits")
        return "RS256"
    raise ConfigError("only RSA (RS256) and EC P-256 (ES256) private keys are supported")


def public_jwk(key: PrivateKey) -> dict[str, str]:
    """The public half as a JWK with only its required members (RFC 7638 order-free)."""
    pub = key.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        numbers = pub.public_numbers()
        return {"kty": "EC", "crv": "P-256", "x": _b64url_int(numbers.x, 32), "y": _b64url_int(numbers.y, 32)}
    numbers_rsa = pub.public_numbers()
    return {"kty": "RSA", "n": _b64url_int(numbers_rsa.n), "e": _b64url_int(numbers_rsa.e)}


def jwk_thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 SHA-256 thumbprint: the required members, sorted, no spaces."""
    required = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("e", "kty", "n")
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


@dataclass(frozen=True, repr=False)
class SigningKey:
    """A private key with its algorithm and key id; never printed."""

    key: PrivateKey = field(compare=False)
    alg: str
    kid: str

    @classmethod
    def of(cls, key: PrivateKey, alg: str | None = None, kid: str | None = None) -> SigningKey:
        natural = _alg_for(key)
        if alg is not None and alg != natural:
            raise ConfigError(f"the key is for {natural}, not {alg}")
        return cls(key, natural, kid or jwk_thumbprint(public_jwk(key)))

    def __repr__(self) -> str:
        return f"SigningKey(alg={self.alg!r}, kid={self.kid!r})"

    __str__ = __repr__

    def __reduce__(self) -> str:
        raise TypeError("a SigningKey cannot be pickled")

    def public_jwk(self) -> dict[str, str]:
        return {**public_jwk(self.key), "kid": self.kid, "alg": self.alg, "use": "sig"}


def sign_jws(key: PrivateKey, alg: str, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A compact JWS over ``claims``; ``alg`` is set in the header from the key."""
    signing_input = f"{_segment({**header, 'alg': alg})}.{_segment(claims)}".encode("ascii")
    if alg == "ES256":
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")  # JWS wants raw r||s, not DER
    elif alg == "RS256":
        assert isinstance(key, rsa.RSAPrivateKey)
        signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    else:
        raise ConfigError(f"unsupported signing algorithm {alg!r}")
    return f"{signing_input.decode('ascii')}.{b64url(signature)}"


def generate_private_key(alg: str = "ES256") -> PrivateKey:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ConfigError(f"alg must be one of {', '.join(ALGORITHMS)}")


def load_private_pem(data: bytes, where: str) -> PrivateKey:
    """Load an unencrypted PEM private key; errors name ``where``, never the content."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{where}: the private key is encrypted; give an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{where}: not a PEM private key (expected an unencrypted PKCS#8, RSA or EC PEM block)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"{where}: only RSA and EC P-256 private keys are supported")
    try:
        _alg_for(key)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None
    return key


def private_pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
