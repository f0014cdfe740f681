"""The one error tree of credential-broker.

Every error a caller can see has a stable ``code`` and ``http_status`` (the
contract in DESIGN.md). Messages are coarse and never carry a secret: only an
HTTP status and an allow-listed OAuth error code from an authorization server
may appear in them.

    BrokerError
    ├── ConfigError                 invalid settings or server config
    ├── InvalidRequest              invalid_request 422
    ├── Unauthorized                unauthorized 401
    ├── UnknownServer               unknown_server 404
    ├── PolicyDenied                policy_denied 403
    ├── StoreDisabled               store_disabled 503
    ├── ServiceUnavailable          unavailable 503 (Redis or database down)
    ├── ResolveTimeout              timeout 504
    ├── UpstreamError               upstream_error 502 (+ status, oauth_error)
    ├── InvalidState                invalid_state 400 (connect state unknown, used or expired)
    ├── ConnectUserMismatch         connect_user_mismatch 403 (the state is burned)
    └── CredentialUnavailable       the user has no usable credential (409)
        ├── NotConnected            not_connected (+ connect_url, reason)
        ├── SubjectTokenMissing     subject_token_missing
        └── NoCredential            no_credential
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BrokerError",
    "ConfigError",
    "InvalidRequest",
    "Unauthorized",
    "UnknownServer",
    "PolicyDenied",
    "StoreDisabled",
    "ServiceUnavailable",
    "ResolveTimeout",
    "UpstreamError",
    "InvalidState",
    "ConnectUserMismatch",
    "UpstreamOutcomeUnknown",
    "CredentialUnavailable",
    "NotConnected",
    "SubjectTokenMissing",
    "NoCredential",
    "OAUTH_ERROR_CODES",
    "error_from_dict",
]

# RFC 6749 §5.2, RFC 8693 §2.2.2 and RFC 7009 codes: the only strings from an
# authorization server that may reach a caller, a log or an audit row.
OAUTH_ERROR_CODES = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_target",
        "access_denied",
        "unsupported_response_type",
        "server_error",
        "temporarily_unavailable",
        "unsupported_token_type",
        "interaction_required",
        "consent_required",
        "login_required",
        "invalid_dpop_proof",  # RFC 9449 section 5
        "use_dpop_nonce",
    }
)


class BrokerError(Exception):
    """Raised for every failure credential-broker reports to a caller."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    default_message: ClassVar[str] = "internal error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)

    def extra(self) -> dict[str, Any]:
        """Fields beyond code and message that the contract adds to this error."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra()}


class ConfigError(BrokerError):
    """Raised when settings or the server config are invalid; names the field."""

    code = "config_error"
    http_status = 500
    default_message = "invalid configuration"


class InvalidRequest(BrokerError):
    """Raised when a caller's input breaks a rule; the message names the field."""

    code = "invalid_request"
    http_status = 422
    default_message = "invalid request"


class Unauthorized(BrokerError):
    """Raised when a service bearer key is missing or wrong."""

    code = "unauthorized"
    http_status = 401
    default_message = "a valid service bearer key is required"


class UnknownServer(BrokerError):
    """Raised when a server name is not in the server config."""

    code = "unknown_server"
    http_status = 404
    default_message = "unknown server"


class PolicyDenied(BrokerError):
    """Raised when the policy hook denies a resolve."""

    code = "policy_denied"
    http_status = 403
    default_message = "denied by policy"


class StoreDisabled(BrokerError):
    """Raised by every store operation when no master key is configured."""

    code = "store_disabled"
    http_status = 503
    default_message = (
        "credential store disabled: set CREDBROKER_MASTER_KEYS (see `credbroker keygen`)"
    )


class ServiceUnavailable(BrokerError):
    """Raised when Redis or the database cannot be reached."""

    code = "unavailable"
    http_status = 503
    default_message = "a backing service is unavailable"


class ResolveTimeout(BrokerError):
    """Raised when a resolve did not finish within the caller's timeout."""

    code = "timeout"
    http_status = 504
    default_message = "resolve timed out"


class UpstreamError(BrokerError):
    """Raised when an authorization server failed or refused a request.

    Carries only the HTTP status (None for a network failure) and an
    allow-listed OAuth error code; never the body or error_description.
    """

    code = "upstream_error"
    http_status = 502
    default_message = "authorization server error"

    def __init__(
        self,
        message: str | None = None,
        *,
        status: int | None = None,
        oauth_error: str | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.oauth_error = oauth_error if oauth_error in OAUTH_ERROR_CODES else None
        self.retryable = retryable
        self.retry_after = retry_after
        if message is None:
            parts = ["authorization server error"]
            if status is not None:
                parts.append(f"status {status}")
            if self.oauth_error:
                parts.append(self.oauth_error)
            message = ": ".join([parts[0], ", ".join(parts[1:])]) if parts[1:] else parts[0]
        super().__init__(message)

    def extra(self) -> dict[str, Any]:
        return {"status": self.status, "oauth_error": self.oauth_error}


class UpstreamOutcomeUnknown(UpstreamError):
    """The request may have reached the authorization server but no answer came
    (a read timeout, a connection cut after sending): a refresh token it carried
    may be spent, so it is not sent again blindly (``broker.lease``)."""


class InvalidState(BrokerError):
    """Raised when a connect state is unknown, already used or expired."""

    code = "invalid_state"
    http_status = 400
    default_message = "connect state is unknown, used or expired"


class ConnectUserMismatch(BrokerError):
    """Raised when a connect flow is completed for a user other than the one it
    was started for; the state is burned, so the link cannot be retried."""

    code = "connect_user_mismatch"
    http_status = 403
    default_message = "this connect link was made for another user; nothing was stored"


class CredentialUnavailable(BrokerError):
    """Raised when the user has no usable credential for the server."""

    code = "no_credential"
    http_status = 409
    default_message = "no credential for this user and server"


class NotConnected(CredentialUnavailable):
    """Raised when an oauth_connect server needs the user to (re)connect."""

    code = "not_connected"
    default_message = "user is not connected to this server"
    NEVER_CONNECTED: ClassVar[str] = "never_connected"
    RECONNECT_REQUIRED: ClassVar[str] = "reconnect_required"

    def __init__(
        self, message: str | None = None, *, reason: str = "never_connected",
        connect_url: str | None = None,
    ) -> None:
        self.reason = reason
        self.connect_url = connect_url
        if message is None:
            message = (
                "user must reconnect to this server"
                if reason == self.RECONNECT_REQUIRED
                else "user has never connected to this server"
            )
        super().__init__(message)

    def extra(self) -> dict[str, Any]:
        return {"reason": self.reason, "connect_url": self.connect_url}


class SubjectTokenMissing(CredentialUnavailable):
    """Raised when minting needs the user's IdP token and none valid is stored."""

    code = "subject_token_missing"
    default_message = "no valid subject token for this user: sign the user in again"


class NoCredential(CredentialUnavailable):
    """Raised when no per-user credential exists and none can be minted."""

    code = "no_credential"


_BY_CODE: dict[str, type[BrokerError]] = {}
for _cls in (
    BrokerError, ConfigError, InvalidRequest, Unauthorized, UnknownServer,
    PolicyDenied, StoreDisabled, ServiceUnavailable, ResolveTimeout,
    UpstreamError, InvalidState, ConnectUserMismatch, NotConnected, SubjectTokenMissing, NoCredential,
):
    _BY_CODE[_cls.code] = _cls


def error_from_dict(data: dict[str, Any]) -> BrokerError:
    """Rebuild an error from its ``to_dict`` form (task results, HTTP bodies)."""
    cls = _BY_CODE.get(str(data.get("error")), BrokerError)
    message = str(data.get("message") or cls.default_message)
    if cls is UpstreamError:
        return UpstreamError(
            message, status=data.get("status"), oauth_error=data.get("oauth_error")
        )
    if cls is NotConnected:
        return NotConnected(
            message, reason=str(data.get("reason") or NotConnected.NEVER_CONNECTED),
            connect_url=data.get("connect_url"),
        )
    return cls(message)
