"""Slack's token-endpoint quirks: ``ok: false`` errors with HTTP 200, and user
tokens nested under ``authed_user``.

``oauth.v2.access`` answers an authorization code with the bot token at the
top level and the user's token under ``authed_user``; the broker holds
per-user credentials, so the user token is the one taken. A refresh of a user
token answers at the top level. ``token_type`` is ``user`` or ``bot`` (a kind
of token, not an HTTP scheme): the token is sent as ``Bearer``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["adapt", "ERROR_CODES"]

# Slack's error strings and their RFC 6749 section 5.2 meaning; others pass
# through and, not being RFC codes, are dropped by the generic parser.
ERROR_CODES = {
    "invalid_refresh_token": "invalid_grant",
    "invalid_code": "invalid_grant",
    "code_already_used": "invalid_grant",
    "code_expired": "invalid_grant",
    "bad_redirect_uri": "invalid_grant",
    "token_revoked": "invalid_grant",
    "token_expired": "invalid_grant",
    "invalid_client_id": "invalid_client",
    "bad_client_secret": "invalid_client",
    "invalid_grant_type": "unsupported_grant_type",
    "ratelimited": "temporarily_unavailable",
    "internal_error": "temporarily_unavailable",
    "service_unavailable": "temporarily_unavailable",
    "fatal_error": "server_error",
}
_TOKEN_FIELDS = ("access_token", "refresh_token", "expires_in", "scope")


def adapt(data: dict[str, Any]) -> dict[str, Any]:
    """The user's token in RFC 6749 shape, or ``{"error": <RFC code>}``."""
    if data.get("ok") is False or (data.get("error") and not data.get("access_token")):
        code = data.get("error")
        return {"error": ERROR_CODES.get(code, code) if isinstance(code, str) else "server_error"}
    user = data.get("authed_user")
    source = user if isinstance(user, dict) and user.get("access_token") else data
    token = {key: source[key] for key in _TOKEN_FIELDS if key in source}
    token["token_type"] = "Bearer"
    return token
