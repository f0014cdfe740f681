"""GitHub's token-endpoint quirk: errors come back with HTTP 200 and GitHub's own codes.

A refresh with a dead refresh token answers ``200 {"error": "bad_refresh_token"}``;
read naively that is a success without a token. Mapped here to the RFC 6749
codes, so ``bad_refresh_token`` is ``invalid_grant`` (reconnect needed), not
a malformed response to retry.
"""

from __future__ import annotations

from typing import Any

__all__ = ["adapt", "ERROR_CODES"]

# GitHub's documented token errors and their RFC 6749 section 5.2 meaning.
ERROR_CODES = {
    "bad_refresh_token": "invalid_grant",
    "bad_verification_code": "invalid_grant",
    "redirect_uri_mismatch": "invalid_grant",
    "incorrect_client_credentials": "invalid_client",
    "unverified_user_email": "access_denied",
}


def adapt(data: dict[str, Any]) -> dict[str, Any]:
    """An error body becomes ``{"error": <RFC code>}``; a token body is already standard."""
    code = data.get("error")
    if isinstance(code, str) and not data.get("access_token"):
        return {"error": ERROR_CODES.get(code, code)}
    return data
