"""Input rules of the HTTP API: bounded JSON bodies, field checks, bearer keys.

Pure functions over bytes and values, so every rule is unit-tested without a
server. Each failure is an ``InvalidRequest`` (422) whose message names the
field and never echoes the value (a misplaced token must not come back).
"""

from __future__ import annotations

import re

import hashlib
import hmac
import json
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from broker.errors import InvalidRequest
from broker.secret import Secret

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_TOKEN_CHARS",
    "bearer_matches",
    "check_fields",
    "parse_instant",
    "parse_json_object",
    "parse_limit",
    "parse_timeout",
    "parse_token",
]

# Every body this API takes is a small flat object; 64 KiB leaves room for a
# large IdP token and refuses anything that would cost real memory.
MAX_BODY_BYTES = 64 * 1024
# Our bodies are flat (depth 1); a little slack, then refuse before any
# recursive code (ours or a logger's) walks a hostile structure.
MAX_JSON_DEPTH = 8
# JWTs from real IdPs stay well under this; the body cap bounds it anyway.
MAX_TOKEN_CHARS = 32 * 1024
# Unix seconds accepted for instants: 1970 up to the year 9999.
_MAX_UNIX = 253402300799


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidRequest("body: a field appears twice")  # never echo what was submitted
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise InvalidRequest("body: NaN and Infinity are not JSON")


def _depth(value: Any) -> int:
    """Nesting depth, iteratively, so a deep value cannot exhaust the stack."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item)
        if deepest > MAX_JSON_DEPTH:
            break
    return deepest


def _bracket_depth(raw: bytes) -> int:
    """Maximum bracket nesting outside strings: checked before parsing."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_JSON_DEPTH:
                    return deepest
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or InvalidRequest saying why not."""
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidRequest(f"body: larger than {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        raise InvalidRequest("body: a JSON object is required")
    if _bracket_depth(raw) > MAX_JSON_DEPTH:
        raise InvalidRequest(f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise InvalidRequest("body: not UTF-8") from None
    except RecursionError:
        raise InvalidRequest(f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:
        # The decoder's message quotes the document: say only where it broke.
        raise InvalidRequest("body: malformed JSON") from None
    if not isinstance(value, dict):
        raise InvalidRequest("body: must be a JSON object")
    if _depth(value) > MAX_JSON_DEPTH:
        raise InvalidRequest(f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")


def echo_names(names: list[str]) -> str:
    """How many unknown names there were: a submitted name is never repeated back
    (it could be a pasted token, or markup for whoever reads the error)."""
    return f"{len(names)} not recognised"


def check_fields(body: Mapping[str, Any], required: Iterable[str], optional: Iterable[str] = ()) -> None:
    """Refuse unknown fields (a typo must not be silently ignored) and missing ones."""
    required = tuple(required)
    allowed = set(required) | set(optional)
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise InvalidRequest(f"body: unknown field(s) {echo_names(unknown)}; allowed: {', '.join(sorted(allowed))}")
    for name in required:
        if name not in body:
            raise InvalidRequest(f"{name}: required")


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # a JSON integer past the float range (1e400 written as a float parses to inf)
        return None
    return number if math.isfinite(number) else None


def parse_instant(value: object, field: str) -> datetime:
    """ISO 8601 (a missing offset means UTC) or unix seconds, as aware UTC."""
    number = _number(value)
    if number is None and isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            number = float(text)  # unix seconds in a query string
        except ValueError:
            try:
                parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "zZ" else text)
            except ValueError:
                raise InvalidRequest(f"{field}: expected ISO 8601 or unix seconds") from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            try:
                return parsed.astimezone(UTC)
            except OverflowError:  # e.g. 9999-12-31T23:59:59-05:00 is past the last representable instant
                raise InvalidRequest(f"{field}: out of range") from None
        if not math.isfinite(number):
            number = None
    if number is None:
        raise InvalidRequest(f"{field}: expected ISO 8601 or unix seconds")
    if not 0 <= number <= _MAX_UNIX:
        raise InvalidRequest(f"{field}: out of range")
    return datetime.fromtimestamp(number, UTC)


def parse_timeout(value: object, cap: float) -> float:
    """A caller's resolve timeout in seconds, capped at the configured one."""
    number = _number(value)
    if number is None or number <= 0:
        raise InvalidRequest("timeout: must be a positive number of seconds")
    return min(number, cap)


def parse_limit(value: str | None, default: int = 100, maximum: int = 1000) -> int:
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or len(value) > 6:  # str.isdigit() also takes "²"
        raise InvalidRequest(f"limit: must be an integer from 1 to {maximum}")
    number = int(value)
    if not 1 <= number <= maximum:
        raise InvalidRequest(f"limit: must be an integer from 1 to {maximum}")
    return number


def parse_token(value: object) -> Secret:
    """The user's IdP token: a non-empty printable string without spaces."""
    if not isinstance(value, str) or not value:
        raise InvalidRequest("token: must be a non-empty string")
    if len(value) > MAX_TOKEN_CHARS:
        raise InvalidRequest(f"token: at most {MAX_TOKEN_CHARS} characters")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise InvalidRequest("token: must be printable without whitespace")
    return Secret(value)


def _digest(value: str) -> bytes:
    # Hash first so compare_digest sees equal lengths: a key's length leaks nothing either.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def bearer_matches(authorization: str | None, keys: Iterable[Secret]) -> bool:
    """True when the ``Authorization: Bearer`` value equals one of ``keys``.

    Compared in constant time against every key, without stopping at a match.
    """
    if not authorization:
        return False
    scheme, _, presented = authorization.partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        return False
    given = _digest(presented)
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, _digest(key.reveal()))
    return matched
