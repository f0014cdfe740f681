"""HS256 JSON Web Tokens with the standard library only.

The sandbox signs its own tokens and is the only party that verifies them,
so a shared-key MAC is enough and keeps the package free of crypto
dependencies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

__all__ = ["JWTError", "encode", "decode", "unverified_claims"]

_HEADER = {"alg": "HS256", "typ": "JWT"}


class JWTError(ValueError):
    """Raised when a token is not a well-formed HS256 JWT signed by our key."""


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise JWTError("bad base64url segment") from exc


def _json_segment(value: dict[str, Any]) -> str:
    return _b64encode(json.dumps(value, separators=(",", ":"), sort_keys=True).encode())


def _sign(signing_input: str, key: bytes) -> str:
    return _b64encode(hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest())


def encode(claims: dict[str, Any], key: bytes) -> str:
    """Serialize and sign ``claims`` as a compact HS256 JWT."""
    signing_input = f"{_json_segment(_HEADER)}.{_json_segment(claims)}"
    return f"{signing_input}.{_sign(signing_input, key)}"


def _split(token: str) -> tuple[str, str, str]:
    parts = token.split(".")
    if len(parts) != 3 or not token.isascii():
        raise JWTError("a JWT has three segments")
    return parts[0], parts[1], parts[2]


def _load(segment: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64decode(segment))
    except (ValueError, UnicodeDecodeError) as exc:
        raise JWTError("segment is not JSON") from exc
    if not isinstance(value, dict):
        raise JWTError("segment is not a JSON object")
    return value


def unverified_claims(token: str) -> dict[str, Any]:
    """Return the payload without checking the signature (for test assertions)."""
    return _load(_split(token)[1])


def decode(token: str, key: bytes) -> dict[str, Any]:
    """Verify the signature and return the claims; expiry is the caller's call.

    Expiry is left out on purpose: revocation and introspection must still
    recognise an expired token as one of ours.
    """
    header, payload, signature = _split(token)
    if _load(header).get("alg") != "HS256":
        raise JWTError("only HS256 is accepted")
    if not hmac.compare_digest(_sign(f"{header}.{payload}", key), signature):
        raise JWTError("bad signature")
    return _load(payload)
