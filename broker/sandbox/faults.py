"""Injected failures: the ways a real authorization server misbehaves.

A fault is armed per endpoint for the next ``count`` requests (``None`` =
until cleared) and served before normal processing, so a broker's retry,
backoff, size-limit and secret-redaction paths can be driven on demand.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.responses import JSONResponse, Response

__all__ = ["ENDPOINTS", "FAULT_MODES", "HUGE_BODY_BYTES", "Fault", "fault_response", "hang"]

ENDPOINTS = frozenset({"token", "revoke", "authorize", "metadata", "introspect"})
FAULT_MODES = frozenset({"5xx", "503", "429", "hang", "malformed", "no_access_token", "huge", "echo_secret",
                         "invalid_grant"})
# Larger than any sane token response, so a broker without a size cap shows it.
HUGE_BODY_BYTES = 2 * 1024 * 1024
# Fields a broker sends that a careless error path might echo back.
_ECHOED_TOKEN_FIELDS = ("subject_token", "assertion", "refresh_token", "code", "token")


@dataclass
class Fault:
    """One armed fault; ``remaining`` counts down, ``None`` never does."""

    mode: str
    remaining: int | None = None
    retry_after: int = 1
    hang_seconds: float = 30.0

    def as_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "count": self.remaining,
            "retry_after": self.retry_after,
            "hang_seconds": self.hang_seconds,
        }


async def hang(fault: Fault, stopping: asyncio.Event | None) -> None:
    """Stall this request only; ends early when the server is stopping."""
    if stopping is None:
        await asyncio.sleep(fault.hang_seconds)
        return
    try:
        await asyncio.wait_for(stopping.wait(), fault.hang_seconds)
    except asyncio.TimeoutError:
        pass


def _huge_body() -> bytes:
    # Valid JSON with a usable-looking token: only a size cap rejects it.
    head = b'{"token_type":"Bearer","expires_in":3600,"access_token":"'
    return head + b"A" * HUGE_BODY_BYTES + b'"}'


def fault_response(fault: Fault, form: Mapping[str, str], client_secret: str | None) -> Response | None:
    """The canned response for ``fault``, or ``None`` to continue normally (hang)."""
    if fault.mode == "5xx":
        return JSONResponse(
            {"error": "temporarily_unavailable", "error_description": "sandbox fault: 503"}, status_code=503
        )
    if fault.mode == "503":  # an outage that says when to come back
        return JSONResponse(
            {"error": "temporarily_unavailable", "error_description": "sandbox fault: 503"},
            status_code=503,
            headers={"Retry-After": str(fault.retry_after)},
        )
    if fault.mode == "invalid_grant":  # a revoked or expired grant
        return JSONResponse({"error": "invalid_grant", "error_description": "sandbox fault: grant revoked"},
                            status_code=400)
    if fault.mode == "429":
        return JSONResponse(
            {"error": "slow_down", "error_description": "sandbox fault: 429"},
            status_code=429,
            headers={"Retry-After": str(fault.retry_after)},
        )
    if fault.mode == "malformed":
        return Response(b'{"access_token": "x",', status_code=200, media_type="application/json")
    if fault.mode == "no_access_token":
        return JSONResponse({"token_type": "Bearer", "expires_in": 3600})
    if fault.mode == "huge":
        return Response(_huge_body(), status_code=200, media_type="application/json")
    if fault.mode == "echo_secret":
        token = next((form[name] for name in _ECHOED_TOKEN_FIELDS if form.get(name)), "")
        description = f"rejected client_secret={client_secret or ''} subject_token={token}"
        body = json.dumps({"error": "invalid_request", "error_description": description})
        return Response(body, status_code=400, media_type="application/json")
    return None
