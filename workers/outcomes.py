"""How a flight's outcome shows as a Celery task state (what Flower counts).

Expected outcomes (the user is not connected, has no subject token, the
policy said no, nothing to refresh) are answers: the task ends SUCCESS with
the error inside its result. A failure at the provider or in the
infrastructure ends the task as FAILURE with ``FlightFailed``, whose text is a
secret-free summary such as ``UpstreamError: 502 invalid_grant`` and whose
second argument is the same error dict a SUCCESS result carries, so callers
read both states the same way (``flight_result``).
"""

from __future__ import annotations

from typing import Any

from broker.errors import error_from_dict

__all__ = ["EXPECTED_CODES", "FlightFailed", "raise_if_failed", "flight_result", "summary"]

# Error codes that are answers, not failures: the flight did its job.
EXPECTED_CODES = frozenset({
    "not_connected", "subject_token_missing", "policy_denied", "no_credential", "unknown_server",
    "config_mismatch",
})


class FlightFailed(Exception):
    """Raised (as the task's outcome) when a flight failed at the provider or in the infrastructure."""

    def __init__(self, text: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(text, result or {})

    def __str__(self) -> str:
        return str(self.args[0])

    def __repr__(self) -> str:
        return str(self.args[0])


def summary(error: dict[str, Any]) -> str:
    """``UpstreamError: 502 invalid_grant``: class, then the non-secret details."""
    exc = error_from_dict(error)
    parts = [str(error[k]) for k in ("status", "oauth_error") if error.get(k) is not None]
    return f"{type(exc).__name__}: {' '.join(parts) if parts else exc.code}"


def raise_if_failed(result: dict[str, Any]) -> dict[str, Any]:
    """Return an answer as the task's result; raise a failure as FlightFailed."""
    error = result.get("error")
    if isinstance(error, dict) and error.get("error") not in EXPECTED_CODES:
        raise FlightFailed(summary(error), result)
    return result


def flight_result(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """The result dict of a finished flight task, from either state (None: no
    usable result, e.g. a lost worker or a foreign exception)."""
    if meta is None:
        return None
    status = meta.get("status")
    result = meta.get("result")
    if status == "SUCCESS":
        return result if isinstance(result, dict) else None
    if status == "FAILURE" and isinstance(result, dict) and result.get("exc_type") == "FlightFailed":
        args = result.get("exc_message")
        if isinstance(args, list | tuple) and len(args) > 1 and isinstance(args[1], dict):
            return args[1]
    return None
