"""Field validators for the servers file, used by ``broker.servers``.

Pure checks with no I/O. Every failure is a ConfigError of the form
``<server>: <field>: <problem>`` and never echoes the offending value: any
value in a config file may be a misplaced secret.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

__all__ = [
    "DEFAULT_HEADER",
    "DEFAULT_HEADER_FORMAT",
    "field_error",
    "optional_str",
    "is_loopback",
    "check_url",
    "check_resource",
    "parse_scopes",
    "check_header",
    "check_header_format",
    "check_server_name",
    "check_env_name",
    "parse_authorize_params",
]

DEFAULT_HEADER = "Authorization"
DEFAULT_HEADER_FORMAT = "Bearer {token}"
MAX_NAME = 128

# RFC 9110 §5.6.2 tchar.
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# RFC 6749 §3.3 scope-token.
_SCOPE_RE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")
_PARAM_NAME_RE = re.compile(r"^[A-Za-z0-9_.~-]{1,64}$")
# Set by the broker on every authorization request; a file must not override them.
_RESERVED_AUTHORIZE_PARAMS = frozenset(
    {"response_type", "client_id", "redirect_uri", "state", "code_challenge", "code_challenge_method",
     "scope", "resource"}
)
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# Headers that route or frame the request: a credential written there would
# break the request or send it somewhere else.
_FORBIDDEN_HEADERS = frozenset(
    {
        "host", "content-length", "content-type", "content-encoding", "transfer-encoding",
        "connection", "keep-alive", "proxy-connection", "upgrade", "te", "trailer", "expect",
    }
)


def field_error(label: str, field: str, problem: str) -> ConfigError:
    """The one message shape: which server, which field, what is wrong."""
    return ConfigError(f"{label}: {field}: {problem}")


def optional_str(entry: Mapping[str, Any], key: str, label: str, field: str) -> str | None:
    """``entry[key]`` as a non-blank string, or None when absent."""
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise field_error(label, field, "must be a non-empty string")
    return value


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (where plain http is tolerable)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(value: str, label: str, field: str, *, https: bool) -> str:
    """An absolute http(s) URL; with ``https``, plain http only for loopback hosts."""
    if _CONTROL_RE.search(value) or " " in value:
        raise field_error(label, field, "must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise field_error(label, field, "is not a valid URL") from None
    host = parts.hostname or ""
    if https:
        if not (parts.scheme == "https" or (parts.scheme == "http" and is_loopback(host))):
            raise field_error(label, field, "must be an https URL (http only for loopback hosts)")
    elif parts.scheme not in ("http", "https"):
        raise field_error(label, field, "must be an http or https URL")
    if not host:
        raise field_error(label, field, "URL has no host")
    if parts.username is not None or parts.password is not None:
        raise field_error(label, field, "must not contain credentials")
    if https and parts.fragment:  # RFC 6749 §3.1, §3.2
        raise field_error(label, field, "must not contain a fragment")
    return value


def check_resource(value: str, label: str, field: str) -> str:
    """RFC 8707 §2: an absolute URI without a fragment."""
    try:
        parts = urlsplit(value)
    except ValueError:
        parts = None
    if parts is None or not parts.scheme or parts.fragment or _CONTROL_RE.search(value) or " " in value:
        raise field_error(label, field, "must be an absolute URI without a fragment")
    return value


def parse_scopes(value: object, label: str, field: str) -> tuple[str, ...]:
    """A list of scopes or one space-separated string; order kept, repeats dropped."""
    if value is None:
        return ()
    if isinstance(value, str):
        items: list[object] = list(value.split())
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise field_error(label, field, "must be a list or a space-separated string")
    scopes: list[str] = []
    for item in items:
        if not isinstance(item, str) or not _SCOPE_RE.match(item):
            raise field_error(label, field, "each scope must be a non-empty string without spaces or quotes")
        if item not in scopes:
            scopes.append(item)
    return tuple(scopes)


def check_header(value: str | None, label: str, field: str) -> str:
    """The header to inject: an RFC 9110 token that routes or frames nothing."""
    if value is None:
        return DEFAULT_HEADER
    if not _TOKEN_RE.match(value):
        raise field_error(label, field, "must be a valid HTTP header name (RFC 9110 token)")
    if value.lower() in _FORBIDDEN_HEADERS:
        raise field_error(label, field, "must not be a connection or framing header such as Host")
    return value


def check_header_format(value: str | None, label: str, field: str) -> str:
    """One ``{token}`` and nothing else in braces, so ``format`` and ``replace`` agree."""
    if value is None:
        return DEFAULT_HEADER_FORMAT
    if "\r" in value or "\n" in value:
        raise field_error(label, field, "must not contain CR or LF")
    if _CONTROL_RE.search(value.replace("\t", "")):
        raise field_error(label, field, "must not contain control characters")
    if value.count("{token}") != 1:
        raise field_error(label, field, "must contain {token} exactly once")
    rest = value.replace("{token}", "")
    if "{" in rest or "}" in rest:
        raise field_error(label, field, "must not contain other {...} placeholders or braces")
    return value


def check_server_name(value: object, position: int) -> str:
    """Non-empty printable text up to 128 characters without ``/``."""
    label = f"server #{position}"
    if not isinstance(value, str) or not value:
        raise field_error(label, "name", "required, a non-empty string")
    if len(value) > MAX_NAME:
        raise field_error(label, "name", f"must be at most {MAX_NAME} characters")
    if not value.isprintable():
        raise field_error(label, "name", "must be printable (no control characters)")
    if "/" in value:
        raise field_error(label, "name", "must not contain '/'")
    if value != value.strip():
        raise field_error(label, "name", "must not start or end with whitespace")
    return value


def check_env_name(value: object, label: str, field: str) -> str:
    """An environment variable name (the variable holds the secret, the file does not)."""
    if not isinstance(value, str) or not _ENV_NAME_RE.match(value):
        raise field_error(label, field, "must be an environment variable name")
    return value


def parse_authorize_params(value: object, label: str, field: str) -> tuple[tuple[str, str], ...]:
    """Extra authorization-request parameters (``access_type``, ``audience``...), sorted by name.

    A null value drops a parameter a provider profile would add.
    """
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise field_error(label, field, "must be a mapping of parameter names to strings")
    params: list[tuple[str, str]] = []
    for name, item in value.items():
        if not isinstance(name, str) or not _PARAM_NAME_RE.match(name):
            raise field_error(label, field, "parameter names must be letters, digits, '_', '.', '~' or '-'")
        if name in _RESERVED_AUTHORIZE_PARAMS:
            raise field_error(label, field, f"must not set {name!r} (the broker sets it)")
        if item is None:
            continue
        if not isinstance(item, str) or not item or _CONTROL_RE.search(item):
            raise field_error(label, f"{field}.{name}", "must be a non-empty string without control characters")
        params.append((name, item))
    return tuple(sorted(params))
