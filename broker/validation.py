"""Input rules shared by the API, the client and the CLI."""

from __future__ import annotations

import re

from .errors import InvalidRequest

__all__ = ["validate_user_id", "validate_server_name", "validate_request_id", "MAX_USER_ID"]

MAX_USER_ID = 256
MAX_SERVER_NAME = 128
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def validate_user_id(value: object, field: str = "user_id") -> str:
    """An opaque user id: printable text up to 256 characters, no ``/``."""
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{field}: must be a non-empty string")
    if len(value) > MAX_USER_ID:
        raise InvalidRequest(f"{field}: at most {MAX_USER_ID} characters")
    if "/" in value:
        raise InvalidRequest(f"{field}: must not contain '/'")
    if not value.isprintable() or value != value.strip():
        raise InvalidRequest(f"{field}: must be printable text without control characters or edge spaces")
    return value


def validate_server_name(value: object, field: str = "server") -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{field}: must be a non-empty string")
    if len(value) > MAX_SERVER_NAME or "/" in value or not value.isprintable():
        raise InvalidRequest(f"{field}: at most {MAX_SERVER_NAME} printable characters, no '/'")
    return value


def validate_request_id(value: str | None) -> str | None:
    """A caller's X-Request-ID, kept only if it is a plain short id."""
    if value is None or not _REQUEST_ID_RE.match(value):
        return None
    return value
