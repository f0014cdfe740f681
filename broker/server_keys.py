"""Servers-file keys for proof-of-possession: ``private_key_jwt`` and ``dpop``.

Kept apart from ``broker.servers`` so that module stays about the common
fields. Errors name the server and field, never a value or a key's content.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .jose import ALGORITHMS, SigningKey, load_private_pem
from .server_config import check_env_name, field_error, optional_str

__all__ = ["ASSERTION_KEYS", "ASSERTION_AUDIENCES", "parse_assertion_key", "parse_assertion_aud", "parse_dpop"]

ASSERTION_KEYS = frozenset(
    {"client_assertion_key_file", "client_assertion_key_env", "client_assertion_kid",
     "client_assertion_alg", "client_assertion_aud", "dpop"}
)
# What the assertion's ``aud`` names: the token endpoint URL (what Okta, Entra,
# Auth0 and Keycloak accept) or the issuer (RFC 7523bis, some FAPI servers).
ASSERTION_AUDIENCES = ("token_endpoint", "issuer")
_MAX_PEM_BYTES = 64 * 1024


def _pem(raw: Mapping[str, Any], label: str, environ: Mapping[str, str]) -> tuple[bytes, str] | None:
    path, env_name = raw.get("client_assertion_key_file"), raw.get("client_assertion_key_env")
    if path is not None and env_name is not None:
        raise field_error(label, "auth_broker.client_assertion_key_file",
                          "give client_assertion_key_file or client_assertion_key_env, not both")
    if path is not None:
        field = "auth_broker.client_assertion_key_file"
        text = optional_str(raw, "client_assertion_key_file", label, field)
        assert text is not None
        try:
            data = Path(text).expanduser().read_bytes()[: _MAX_PEM_BYTES + 1]
        except OSError as exc:
            raise field_error(label, field, f"cannot read the key file ({exc.strerror or 'unreadable'})") from None
        if len(data) > _MAX_PEM_BYTES:
            raise field_error(label, field, "the key file is too large for a PEM private key")
        return data, f"{label}: {field}"
    if env_name is not None:
        field = "auth_broker.client_assertion_key_env"
        name = check_env_name(env_name, label, field)
        value = environ.get(name)
        if not value:
            raise field_error(label, field, f"environment variable {name!r} is not set or empty")
        # A PEM squeezed onto one line by an env file keeps literal "\n"s.
        return value.replace("\\n", "\n").encode("utf-8", "replace"), f"{label}: {field} ({name})"
    return None


def parse_assertion_key(
    raw: Mapping[str, Any], label: str, environ: Mapping[str, str], *, private_key_jwt: bool
) -> SigningKey | None:
    """The client assertion signing key, required exactly when ``client_auth: private_key_jwt``."""
    pem = _pem(raw, label, environ)
    if not private_key_jwt:
        extra = sorted(k for k in ("client_assertion_key_file", "client_assertion_key_env",
                                   "client_assertion_kid", "client_assertion_alg", "client_assertion_aud")
                       if raw.get(k) is not None)
        if extra:
            raise field_error(label, f"auth_broker.{extra[0]}", "only used with client_auth: private_key_jwt")
        return None
    if pem is None:
        raise field_error(label, "auth_broker.client_auth",
                          "private_key_jwt needs client_assertion_key_file or client_assertion_key_env")
    alg = raw.get("client_assertion_alg")
    if alg is not None and alg not in ALGORITHMS:
        raise field_error(label, "auth_broker.client_assertion_alg", f"must be one of {', '.join(ALGORITHMS)}")
    kid = optional_str(raw, "client_assertion_kid", label, "auth_broker.client_assertion_kid")
    if kid is not None and any(not c.isprintable() for c in kid):
        raise field_error(label, "auth_broker.client_assertion_kid", "must be printable text")
    data, where = pem
    key = load_private_pem(data, where)
    try:
        return SigningKey.of(key, alg, kid)
    except ConfigError as exc:
        raise field_error(label, "auth_broker.client_assertion_alg", exc.message) from None


def parse_assertion_aud(raw: Mapping[str, Any], label: str, issuer: str | None) -> str:
    value = raw.get("client_assertion_aud") or "token_endpoint"
    field = "auth_broker.client_assertion_aud"
    if value not in ASSERTION_AUDIENCES:
        raise field_error(label, field, f"must be one of {', '.join(ASSERTION_AUDIENCES)}")
    if value == "issuer" and issuer is None:
        raise field_error(label, field, "issuer needs auth_broker.issuer")
    return str(value)


def parse_dpop(raw: Mapping[str, Any], label: str) -> bool:
    value = raw.get("dpop", False)
    if not isinstance(value, bool):
        raise field_error(label, "auth_broker.dpop", "must be true or false")
    return value
