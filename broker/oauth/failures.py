"""Failure classes of a renewal: whether asking again later can help.

Permanent failures need a person or a configuration change (a revoked grant,
a wrong client secret, a scope the server will never grant): asking again
only spends the provider's patience, so a refresh is not retried (the user
must reconnect) and a mint is not retried until the subject token changes.
Transient failures (network, timeouts, 5xx, 429, ``temporarily_unavailable``)
are retried later, per credential, with backoff.
"""

from __future__ import annotations

from enum import StrEnum

from ..errors import BrokerError, SubjectTokenMissing, UpstreamError

__all__ = ["FailureClass", "PERMANENT_OAUTH_ERRORS", "TRANSIENT_OAUTH_ERRORS", "classify"]


class FailureClass(StrEnum):
    """Whether a later attempt of the same renewal may succeed."""

    PERMANENT = "permanent"
    TRANSIENT = "transient"


# RFC 6749 §5.2 codes that no amount of waiting fixes.
PERMANENT_OAUTH_ERRORS = frozenset(
    {"invalid_grant", "invalid_client", "unauthorized_client", "invalid_scope", "unsupported_grant_type"}
)
# Codes that say "later" whatever status carries them (some servers send them with 400).
TRANSIENT_OAUTH_ERRORS = frozenset({"temporarily_unavailable", "server_error"})


def classify(exc: BrokerError) -> FailureClass:
    """The class of a failed renewal.

    A missing or expired subject token is permanent until the gateway stores a
    new one. Anything not clearly permanent (a malformed 2xx answer, a
    redirect) is transient: backoff bounds its cost, while a wrong
    ``needs_reconnect`` would cost the user a consent screen.
    """
    if isinstance(exc, SubjectTokenMissing):
        return FailureClass.PERMANENT
    if not isinstance(exc, UpstreamError):
        return FailureClass.TRANSIENT
    if exc.oauth_error in TRANSIENT_OAUTH_ERRORS:
        return FailureClass.TRANSIENT
    if exc.oauth_error in PERMANENT_OAUTH_ERRORS:
        return FailureClass.PERMANENT
    status = exc.status
    if status is None or status >= 500 or status in (408, 429):
        return FailureClass.TRANSIENT
    if 400 <= status < 500:
        return FailureClass.PERMANENT
    return FailureClass.TRANSIENT
