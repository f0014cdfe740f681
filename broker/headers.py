"""Header injection: the one header an upstream call carries for the user."""

from __future__ import annotations

import re
from collections.abc import MutableMapping

from .errors import InvalidRequest, UpstreamError
from .secret import Secret

__all__ = ["render_header_value", "apply_header"]

# One regex search, not a per-character scan: this runs on every resolve, fast path included.
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f]")


def render_header_value(header_format: str, token: Secret) -> Secret:
    """Fill ``header_format``; a token with CR, LF or another control character
    is refused, so a hostile provider cannot split a header."""
    raw = token.reveal()
    if _FORBIDDEN.search(raw):
        raise UpstreamError("authorization server returned a token with control characters")
    return Secret(header_format.replace("{token}", raw))


def apply_header(headers: MutableMapping[str, str], name: str, value: Secret) -> MutableMapping[str, str]:
    """Set ``name`` on ``headers``, replacing any header of that name whatever
    its case; the caller's inbound token is dropped, never merged."""
    raw = value.reveal()
    if "\r" in raw or "\n" in raw or "\x00" in raw:
        raise InvalidRequest("header value contains CR, LF or NUL")
    for existing in [k for k in headers if k.lower() == name.lower()]:
        del headers[existing]
    headers[name] = raw
    return headers
