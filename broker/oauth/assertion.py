"""RFC 7523 §2.2 client assertions: the signed JWT of ``private_key_jwt``.

Pure apart from the random ``jti``: the caller passes ``now`` (seconds since
the epoch), so lifetimes are tested without a clock.
"""

from __future__ import annotations

import secrets

from ..jose import SigningKey, sign_jws

__all__ = ["CLIENT_ASSERTION_TYPE", "ASSERTION_LIFETIME_SECONDS", "client_assertion"]

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Short: an assertion is used once, right away; a stolen one dies quickly.
ASSERTION_LIFETIME_SECONDS = 60


def client_assertion(
    key: SigningKey, client_id: str, audience: str, now: float,
    lifetime: int = ASSERTION_LIFETIME_SECONDS, jti: str | None = None,
) -> str:
    """A one-time signed assertion: ``iss`` = ``sub`` = client_id, ``aud`` the server."""
    issued = int(now)
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": issued,
        "nbf": issued,
        "exp": issued + lifetime,
        "jti": jti or secrets.token_urlsafe(24),
    }
    return sign_jws(key.key, key.alg, {"typ": "JWT", "kid": key.kid}, claims)
