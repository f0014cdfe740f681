"""Client authentication at the token, revocation and introspection endpoints.

Four methods, as a broker may use any of them: ``client_secret_post``,
``client_secret_basic`` (RFC 6749 §2.3.1: id and secret are
form-urlencoded *before* Base64, so reserved characters survive),
``private_key_jwt`` (RFC 7523: checked by ``pop``, through the
``check_assertion`` the app passes in) and ``none`` for public clients.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote_plus

from .errors import OAuthError

__all__ = ["ClientCredentials", "AssertionCheck", "extract_client", "authenticate"]


@dataclass(frozen=True)
class ClientCredentials:
    """What a request presented: the id, the secret if any, and how."""

    client_id: str | None
    client_secret: str | None
    method: str  # client_secret_post | client_secret_basic | private_key_jwt | none
    assertion: str | None = None


# Verifies a private_key_jwt assertion; returns the client id or raises invalid_client.
AssertionCheck = Callable[[ClientCredentials], str]
_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _assertion_issuer(assertion: str) -> str | None:
    try:
        payload = assertion.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, UnicodeDecodeError):
        return None
    iss = claims.get("iss") if isinstance(claims, dict) else None
    return iss if isinstance(iss, str) else None


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
    if form.get("client_assertion") or form.get("client_assertion_type"):
        if authorization or form.get("client_secret"):
            raise OAuthError("invalid_request", "more than one client authentication method")
        if form.get("client_assertion_type") != _ASSERTION_TYPE or not form.get("client_assertion"):
            raise OAuthError("invalid_client", "unsupported client assertion", status=401)
        assertion = str(form["client_assertion"])
        client_id = form.get("client_id") or _assertion_issuer(assertion)
        return ClientCredentials(client_id, None, "private_key_jwt", assertion)
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
    check_assertion: AssertionCheck | None = None,
) -> str:
    """Return the authenticated client id or raise ``invalid_client`` (401)."""
    if presented.method == "private_key_jwt":
        if check_assertion is None:
            raise OAuthError("invalid_client", "private_key_jwt is not accepted here", status=401)
        return check_assertion(presented)
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
