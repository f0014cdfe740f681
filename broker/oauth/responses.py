"""Pure parsers for authorization-server responses.

Only an HTTP status and an allow-listed OAuth ``error`` code ever leave this
module; ``error_description``, ``error_uri`` and bodies are dropped here so no
caller, log or audit row can leak them.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

from ..errors import OAUTH_ERROR_CODES, UpstreamError
from ..models import Credential, ObtainedVia
from ..secret import Secret

__all__ = [
    "parse_token_response",
    "parse_error_response",
    "parse_retry_after",
    "jwt_expiry",
    "is_retryable_status",
    "MAX_EXPIRES_IN",
    "RETRY_AFTER_CAP",
]

# Longer lifetimes are a server bug or an attack on the refresh schedule.
MAX_EXPIRES_IN = 10 * 365 * 86400
# A Retry-After longer than this is treated as this; the sender gives up anyway
# when it exceeds the retry budget, and the caller may retry later.
RETRY_AFTER_CAP = 300.0
# Error codes that mean "try again" even when the status is a 4xx.
_RETRYABLE_CODES = frozenset({"temporarily_unavailable"})
_TOKEN_TYPES = {"bearer": "Bearer", "dpop": "DPoP", "mac": "MAC"}


def is_retryable_status(status: int) -> bool:
    """Transient statuses: 5xx, 429 Too Many Requests and 408 Request Timeout."""
    return status >= 500 or status in (408, 429)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP-date), capped."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


_INVALID = object()


def _load_json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return _INVALID


def parse_error_response(
    status: int, headers: Mapping[str, str], body: bytes, *, now: datetime | None = None
) -> UpstreamError:
    """Map a failed response to an UpstreamError with status and allow-listed code only."""
    data = _load_json(body)
    code = data.get("error") if isinstance(data, dict) else None
    oauth_error = code if isinstance(code, str) and code in OAUTH_ERROR_CODES else None
    retryable = is_retryable_status(status) or oauth_error in _RETRYABLE_CODES
    retry_after = parse_retry_after(_header(headers, "Retry-After"), now)
    return UpstreamError(
        status=status, oauth_error=oauth_error, retryable=retryable, retry_after=retry_after
    )


# One regex match per value, not a per-character loop: tokens are long and every flight parses one.
_VSCHAR = re.compile(r"[\x20-\x7e]*")
_VSCHAR_NO_SPACE = re.compile(r"[\x21-\x7e]*")


def _visible(value: str, *, allow_space: bool) -> bool:
    # RFC 6749 Appendix A: tokens are VSCHAR (%x20-7E). Anything else, CR and
    # LF above all, would let a server inject headers where we forward it.
    return (_VSCHAR if allow_space else _VSCHAR_NO_SPACE).fullmatch(value) is not None


def _malformed(what: str, status: int) -> UpstreamError:
    return UpstreamError(f"authorization server returned {what}", status=status)


def _b64url_json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    try:
        return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8"))
    except (binascii.Error, UnicodeError, ValueError, RecursionError):
        return None


def jwt_expiry(token: str) -> datetime | None:
    """The ``exp`` of a JWS-compact token, unverified; None for anything else.

    We are not the token's audience, so we only read when it will stop
    working; the upstream that receives it verifies it.
    """
    segments = token.split(".")
    if len(segments) != 3 or not segments[1]:
        return None  # opaque, or JWE (5 segments, payload encrypted)
    payload = _b64url_json(segments[1])
    if not isinstance(payload, dict):
        return None
    exp = payload.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    if not math.isfinite(exp) or not 0 < exp < 253402300799:  # before year 10000
        return None
    return datetime.fromtimestamp(exp, UTC)


def _expires_in(value: Any, status: int) -> float:
    if isinstance(value, bool):
        raise _malformed("an invalid expires_in", status)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _malformed("an invalid expires_in", status) from None
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise _malformed("an invalid expires_in", status)
    if not 0 <= value <= MAX_EXPIRES_IN:
        raise _malformed("an out-of-range expires_in", status)
    return float(value)


def _scopes(value: Any, requested: tuple[str, ...]) -> tuple[str, ...]:
    # RFC 6749 §5.1: scope is omitted when it equals the requested scope.
    if isinstance(value, str) and value.strip():
        return tuple(value.split())
    if isinstance(value, list) and value and all(isinstance(s, str) for s in value):
        return tuple(value)  # some servers send a JSON array
    return requested


def parse_token_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    obtained_via: ObtainedVia,
    requested_scopes: Iterable[str] = (),
    now: datetime,
    audience: str | None = None,
    adapt: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    default_lifetime: int | None = None,
) -> Credential:
    """Turn a token-endpoint response into a Credential, or raise UpstreamError.

    ``now`` should be read before the request was sent, so the computed
    expiry errs early rather than late. ``adapt`` (a provider profile's)
    rewrites the parsed JSON into RFC 6749 shape first. The expiry is
    ``expires_in``, else the access token's own JWT ``exp``, else
    ``default_lifetime`` seconds, else None (no expiry known).
    """
    if not 200 <= status < 300:
        raise parse_error_response(status, headers, body, now=now)
    data = _load_json(body)
    if data is _INVALID:
        raise _malformed("malformed JSON", status)
    if not isinstance(data, dict):
        raise _malformed("a JSON response that is not an object", status)
    if adapt is not None:
        data = adapt(data)
    access_token = data.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        code = data.get("error")
        if isinstance(code, str):  # e.g. GitHub answers errors with 200
            raise UpstreamError(status=status, oauth_error=code, retryable=code in _RETRYABLE_CODES)
        raise _malformed("a response without access_token", status)
    if not _visible(access_token, allow_space=True) or access_token.strip() != access_token:
        raise _malformed("an access_token with invalid characters", status)

    token_type = data.get("token_type", "Bearer")
    if not isinstance(token_type, str) or not token_type or not _visible(token_type, allow_space=False):
        raise _malformed("an invalid token_type", status)
    token_type = _TOKEN_TYPES.get(token_type.lower(), token_type)

    if data.get("expires_in") is not None:
        expires_at: datetime | None = now + timedelta(seconds=_expires_in(data["expires_in"], status))
    else:
        expires_at = jwt_expiry(access_token)
        if expires_at is None and default_lifetime is not None:
            expires_at = now + timedelta(seconds=default_lifetime)

    refresh_token = data.get("refresh_token")
    if refresh_token is not None and not isinstance(refresh_token, str):
        raise _malformed("an invalid refresh_token", status)
    if refresh_token and not _visible(refresh_token, allow_space=True):
        raise _malformed("a refresh_token with invalid characters", status)

    return Credential(
        access_token=Secret(access_token),
        obtained_via=obtained_via,
        token_type=token_type,
        expires_at=expires_at,
        issued_at=now,
        refresh_token=Secret(refresh_token) if refresh_token else None,
        scopes=_scopes(data.get("scope"), tuple(requested_scopes)),
        audience=audience,
    )
