"""Client authentication at the token, revocation and introspection endpoints.

Three methods, as a broker may use any of them: ``client_secret_post``,
``client_secret_basic`` (RFC 6749 §2.3.1: id and secret are
form-urlencoded *before* Base64, so reserved characters survive) and
``none`` for public clients.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote_plus

from .errors import OAuthError

__all__ = ["ClientCredentials", "extract_client", "authenticate"]


@dataclass(frozen=True)
class ClientCredentials:
    """What a request presented: the id, the secret if any, and how."""

    client_id: str | None
    client_secret: str | None
    method: str  # client_secret_post | client_secret_basic | none


def _parse_basic(header: str) -> tuple[str, str]:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        raise OAuthError("invalid_client", "unsupported Authorization scheme", status=401)
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise OAuthError("invalid_client", "malformed Basic credentials", status=401) from exc
    user, sep, password = decoded.partition(":")
    if not sep:
        raise OAuthError("invalid_client", "malformed Basic credentials", status=401)
    return unquote_plus(user), unquote_plus(password)


def extract_client(headers: Mapping[str, str], form: Mapping[str, str]) -> ClientCredentials:
    """Read the presented client credentials without judging them.

    Kept apart from :func:`authenticate` so the request log can say which
    method a broker used even when authentication then fails.
    """
    authorization = headers.get("authorization")
    if authorization:
        client_id, secret = _parse_basic(authorization)
        if form.get("client_secret"):
            raise OAuthError("invalid_request", "more than one client authentication method")
        if form.get("client_id") and form["client_id"] != client_id:
            raise OAuthError("invalid_client", "client_id mismatch", status=401)
        return ClientCredentials(client_id, secret, "client_secret_basic")
    if form.get("client_secret"):
        return ClientCredentials(form.get("client_id") or None, form["client_secret"], "client_secret_post")
    return ClientCredentials(form.get("client_id") or None, None, "none")


def authenticate(
    presented: ClientCredentials,
    clients: Mapping[str, str | None],
    *,
    allow_public: bool,
) -> str:
    """Return the authenticated client id or raise ``invalid_client`` (401)."""
    challenge = {"WWW-Authenticate": 'Basic realm="sandbox"'} if presented.method == "client_secret_basic" else None
    if presented.client_id is None or presented.client_id not in clients:
        raise OAuthError("invalid_client", "unknown client", status=401, headers=challenge)
    expected = clients[presented.client_id]
    if expected is None:
        if presented.client_secret is not None:
            raise OAuthError("invalid_client", "public client must not send a secret", status=401, headers=challenge)
        if not allow_public:
            raise OAuthError("invalid_client", "client authentication required", status=401)
        return presented.client_id
    if presented.client_secret is None:
        raise OAuthError("invalid_client", "client authentication required", status=401)
    if not hmac.compare_digest(presented.client_secret.encode(), expected.encode()):
        raise OAuthError("invalid_client", "bad client credentials", status=401, headers=challenge)
    return presented.client_id
