"""PKCE (RFC 7636, S256 only) and the connect flow's opaque state."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

__all__ = ["new_verifier", "s256_challenge", "new_state"]

# RFC 7636 §4.1: 43-128 characters of [A-Z] / [a-z] / [0-9] / "-" / "." / "_" / "~".
_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")


def new_verifier() -> str:
    """A fresh code verifier: 64 random bytes, base64url, 86 characters."""
    # token_urlsafe only emits [A-Za-z0-9_-], a subset of the unreserved set.
    return secrets.token_urlsafe(64)


def s256_challenge(verifier: str) -> str:
    """The S256 code challenge: BASE64URL(SHA256(ASCII(verifier))), unpadded.

    A verifier outside the RFC grammar raises ValueError rather than producing
    a challenge the authorization server will reject at redemption time.
    """
    if not _VERIFIER.fullmatch(verifier):
        raise ValueError("PKCE verifier must be 43-128 unreserved characters")
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_state() -> str:
    """An opaque connect-flow state: 256 random bits, urlsafe, 43 characters."""
    return secrets.token_urlsafe(32)
