"""DPoP (RFC 9449): per-(user, server) proof keys and the proofs they sign.

A ``DPoPKey`` is an EC P-256 key (ES256: small and fast). It travels only
sealed: as ``to_private_jwk()`` inside the credential record (keyring) and
the cache envelope (transport key). Every proof is minted fresh, with its own
``jti``; ``now`` is passed in, so proofs are tested without a clock.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cryptography.hazmat.primitives.asymmetric import ec

from .jose import b64url, jwk_thumbprint, public_jwk, sign_jws

__all__ = ["DPoPKey", "dpop_proof", "htu", "access_token_hash", "DPOP_NONCE_ERROR"]

DPOP_NONCE_ERROR = "use_dpop_nonce"
_TYP = "dpop+jwt"


def htu(url: str) -> str:
    """The ``htu`` of a request URL: without query and fragment (RFC 9449 §4.2)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path or "/", "", ""))


def access_token_hash(token: str) -> str:
    """``ath``: base64url SHA-256 of the access token's ASCII bytes."""
    return b64url(hashlib.sha256(token.encode("ascii")).digest())


def _b64int(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


class DPoPKey:
    """One DPoP key pair; ``repr`` never shows the private part."""

    __slots__ = ("_key", "jwk", "thumbprint", "_private_jwk")

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("DPoP keys are EC P-256")
        self._key = key
        self.jwk: dict[str, str] = public_jwk(key)
        self.thumbprint = jwk_thumbprint(self.jwk)
        self._private_jwk: dict[str, str] | None = None

    @classmethod
    def generate(cls) -> DPoPKey:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_private_jwk(cls, jwk: dict[str, Any]) -> DPoPKey:
        """Rebuild from ``to_private_jwk()``; a small cache spares the fast path the
        point arithmetic of loading the same key again (keyed by the whole JWK)."""
        cache_key = (jwk["d"], jwk["x"], jwk["y"])
        with _CACHE_LOCK:
            hit = _CACHE.get(cache_key)
            if hit is not None:
                _CACHE.move_to_end(cache_key)
                return hit
        if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
            raise ValueError("DPoP key is not an EC P-256 JWK")
        public = ec.EllipticCurvePublicNumbers(_b64int(jwk["x"]), _b64int(jwk["y"]), ec.SECP256R1())
        key = cls(ec.EllipticCurvePrivateNumbers(_b64int(jwk["d"]), public).private_key())
        with _CACHE_LOCK:
            _CACHE[cache_key] = key
            if len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        return key

    def to_private_jwk(self) -> dict[str, str]:
        """The private JWK (``d`` included): only ever sealed."""
        if self._private_jwk is None:
            d = self._key.private_numbers().private_value
            self._private_jwk = {**self.jwk, "d": b64url(d.to_bytes(32, "big"))}
        return dict(self._private_jwk)

    def sign(self, header: dict[str, Any], claims: dict[str, Any]) -> str:
        return sign_jws(self._key, "ES256", header, claims)

    def __repr__(self) -> str:
        return f"DPoPKey(jkt={self.thumbprint!r})"

    __str__ = __repr__

    def __reduce__(self) -> str:
        raise TypeError("a DPoPKey cannot be pickled")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DPoPKey) and other.thumbprint == self.thumbprint

    def __hash__(self) -> int:
        return hash(self.thumbprint)


# Loaded keys by private JWK: a gateway resolves the same few pairs over and over.
_CACHE: OrderedDict[tuple[str, str, str], DPoPKey] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 1024


def dpop_proof(
    key: DPoPKey, method: str, url: str, now: float, *,
    nonce: str | None = None, access_token: str | None = None, jti: str | None = None,
) -> str:
    """A fresh proof for one HTTP request; ``access_token`` adds ``ath`` (resource requests)."""
    claims: dict[str, Any] = {
        "jti": jti or secrets.token_urlsafe(16),
        "htm": method.upper(),
        "htu": htu(url),
        "iat": int(now),
    }
    if nonce is not None:
        claims["nonce"] = nonce
    if access_token is not None:
        claims["ath"] = access_token_hash(access_token)
    return key.sign({"typ": _TYP, "jwk": key.jwk}, claims)
