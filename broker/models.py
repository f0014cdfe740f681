"""Domain values: credentials, subject tokens and their non-secret metadata."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum

from .dpop import DPoPKey
from .secret import Secret

__all__ = [
    "ObtainedVia",
    "CredentialStatus",
    "Credential",
    "SubjectToken",
    "StoredCredential",
    "refresh_point",
]


class ObtainedVia(StrEnum):
    """How a credential was acquired; also the audit ``method``."""

    TOKEN_EXCHANGE = "token_exchange"
    ENTRA_OBO = "entra_obo"
    CONNECT_FLOW = "connect_flow"
    IDENTITY_ASSERTION = "identity_assertion"


class CredentialStatus(StrEnum):
    """The status a user sees in a credentials listing."""

    CONNECTED = "connected"
    DEGRADED = "degraded"  # last renewal failed, credential still valid
    EXPIRED = "expired"
    NEEDS_RECONNECT = "needs_reconnect"
    NOT_CONNECTED = "not_connected"


@dataclass(frozen=True)
class Credential:
    """A per-user upstream credential as an authorization server issued it."""

    access_token: Secret
    obtained_via: ObtainedVia
    token_type: str = "Bearer"
    expires_at: datetime | None = None
    issued_at: datetime | None = None
    refresh_token: Secret | None = None
    scopes: tuple[str, ...] = ()
    audience: str | None = None
    # DPoP servers: the key the token is bound to (sealed wherever it is stored).
    dpop_key: DPoPKey | None = None

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def is_near_expiry(self, now: datetime, near_expiry: timedelta, fraction: float = 1.0) -> bool:
        """True once the refresh point has been reached (see ``refresh_point``)."""
        point = refresh_point(self.issued_at, self.expires_at, near_expiry, fraction)
        return point is not None and now >= point

    def metadata(self) -> dict[str, object]:
        """The non-secret fields, as the policy hook and listings see them."""
        return {
            "token_type": self.token_type,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "scopes": list(self.scopes),
            "audience": self.audience,
            "obtained_via": self.obtained_via.value,
        }

    def with_changes(self, **changes: object) -> Credential:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SubjectToken:
    """The user's IdP token, the subject of token exchange and OBO."""

    token: Secret
    expires_at: datetime | None = None

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True)
class StoredCredential:
    """A credential record as read from the store, with its fence version."""

    user_id: str
    server_key: str
    credential: Credential
    status: CredentialStatus
    version: int
    updated_at: datetime
    last_used_at: datetime | None = None
    refresh_at: datetime | None = None
    failure: str | None = field(default=None)
    # Scheduling: no renewal before ``next_attempt_at`` (backoff after
    # ``failure_count`` consecutive failures); ``keepalive_at``: renew by then
    # even if idle, before the refresh token dies of disuse.
    next_attempt_at: datetime | None = None
    failure_count: int = 0
    keepalive_at: datetime | None = None
    # The lease fence (see ``broker.lease``): who may present this row's
    # refresh or subject token now, and until when in the database's clock.
    lease_owner: str | None = None
    lease_until: datetime | None = None


def refresh_point(
    issued_at: datetime | None,
    expires_at: datetime | None,
    near_expiry: timedelta,
    fraction: float = 1.0,
) -> datetime | None:
    """When a credential should be renewed: the earlier of ``fraction`` of its
    lifetime and ``near_expiry`` before it expires. None: it never expires."""
    if expires_at is None:
        return None
    point = expires_at - near_expiry
    if issued_at is not None and fraction < 1.0 and expires_at > issued_at:
        point = min(point, issued_at + (expires_at - issued_at) * fraction)
    return point
