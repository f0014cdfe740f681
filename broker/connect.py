"""The per-user OAuth connect flow (authorization code + PKCE S256) and disconnect.

Start binds a fresh state (256 random bits) to the user, the server and a PKCE
verifier; the callback consumes it once, checks its age against the injected
clock, exchanges the code with the bound verifier and stores the credential
for the user who started the flow, tagged ``connect_flow``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from .audit import Action, AuditSink, Outcome, record_event
from .clock import Clock
from .errors import BrokerError, InvalidRequest, ServiceUnavailable, UpstreamError
from .models import Credential, CredentialStatus, StoredCredential
from .oauth.pkce import new_state, new_verifier
from .secret import Secret
from .servers import Mode, ServerConfig, ServerRegistry
from .state import StateStore
from .store import CredentialStore

__all__ = ["ConnectFlow", "ConnectStart", "ConnectResult", "ConnectError", "OAuthPort"]

log = logging.getLogger(__name__)


class OAuthPort(Protocol):
    """What the connect flow and resolver need from an authorization-server client."""

    def mint(self, server: ServerConfig, subject_token: Secret) -> Credential: ...
    def redeem_code(self, server: ServerConfig, code: str, verifier: str, redirect_uri: str) -> Credential: ...
    def refresh(self, server: ServerConfig, credential: Credential) -> Credential: ...
    def revoke(self, server: ServerConfig, credential: Credential) -> bool: ...
    def authorize_url(self, server: ServerConfig, state: str, verifier: str, redirect_uri: str) -> str: ...


class ConnectError(BrokerError):
    """Raised when a connect callback cannot complete; ``reason`` is coarse."""

    code = "connect_failed"
    http_status = 400
    default_message = "connect flow failed"

    def __init__(self, reason: str, message: str | None = None) -> None:
        self.reason = reason
        super().__init__(message or f"connect flow failed: {reason}")

    def extra(self) -> dict[str, Any]:
        return {"reason": self.reason}


@dataclass(frozen=True)
class ConnectStart:
    connect_url: str
    expires_at: datetime


@dataclass(frozen=True)
class ConnectResult:
    user_id: str
    server: str


class ConnectFlow:
    """Start, complete and undo a user's connection to an oauth_connect server."""

    def __init__(
        self,
        servers: ServerRegistry,
        store: CredentialStore,
        oauth: OAuthPort,
        states: StateStore,
        audit: AuditSink,
        clock: Clock,
        callback_url: str,
        ttl_seconds: int = 600,
        *,
        lease_seconds: float = 75.0,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.servers = servers
        self.store = store
        self.oauth = oauth
        self.states = states
        self.audit = audit
        self.clock = clock
        self.callback_url = callback_url
        self.ttl = ttl_seconds
        self.lease_seconds = lease_seconds
        self._sleep = sleep
        self._monotonic = monotonic

    def _audit(self, outcome: Outcome, user_id: str | None, server: str | None, reason: str | None = None,
               action: Action = Action.CONNECT, request_id: str | None = None, method: str = "connect") -> None:
        record_event(self.audit, self.clock.now(), action, outcome, user_id=user_id, server=server,
                     method=method, reason=reason, request_id=request_id)

    def start(self, user_id: str, server_name: str) -> ConnectStart:
        server = self.servers.get_server(server_name)
        if server.mode is not Mode.OAUTH_CONNECT:
            raise InvalidRequest(f"server: {server_name!r} does not use the connect flow (mode {server.mode.value})")
        if not self.store.enabled:
            self.store.get(user_id, server.key)  # raises StoreDisabled, clearly, before a user consents
        state, verifier = new_state(), new_verifier()
        now = self.clock.now()
        expires_at = now + timedelta(seconds=self.ttl)
        self.states.put(state, {"u": user_id, "s": server.name, "k": server.key, "v": verifier,
                                "exp": expires_at.timestamp()}, self.ttl)
        url = self.oauth.authorize_url(server, state, verifier, self.callback_url)
        return ConnectStart(url, expires_at)

    def callback(self, state: str | None, code: str | None = None, error: str | None = None,
                 request_id: str | None = None) -> ConnectResult:
        """Complete the flow; raises ConnectError with a coarse reason otherwise."""
        if not state or len(state) > 512:
            self._audit(Outcome.FAILURE, None, None, "missing_state", request_id=request_id)
            raise ConnectError("invalid_state", "connect flow failed: missing or invalid state")
        data = self.states.take(state)
        if data is None:
            self._audit(Outcome.FAILURE, None, None, "unknown_state", request_id=request_id)
            raise ConnectError("invalid_state", "connect flow failed: unknown, used or expired state")
        user_id, server_name = str(data["u"]), str(data["s"])
        if self.clock.now().timestamp() > float(data["exp"]):
            self._audit(Outcome.FAILURE, user_id, server_name, "expired_state", request_id=request_id)
            raise ConnectError("expired_state", "connect flow failed: the connect link expired; start again")
        server = self.servers.get(server_name)
        if server is None or server.key != data["k"]:
            # The server was removed or its URL changed since the flow started.
            self._audit(Outcome.FAILURE, user_id, server_name, "server_changed", request_id=request_id)
            raise ConnectError("server_changed", "connect flow failed: server configuration changed; start again")
        if error:
            reason = "access_denied" if error == "access_denied" else "authorization_error"
            self._audit(Outcome.DENIED if reason == "access_denied" else Outcome.FAILURE,
                        user_id, server_name, reason, request_id=request_id)
            raise ConnectError(reason, "connect flow failed: consent was denied" if reason == "access_denied" else None)
        if not code:
            self._audit(Outcome.FAILURE, user_id, server_name, "missing_code", request_id=request_id)
            raise ConnectError("missing_code")
        try:
            credential = self.oauth.redeem_code(server, code, str(data["v"]), self.callback_url)
        except UpstreamError as exc:
            self._audit(Outcome.FAILURE, user_id, server_name, exc.oauth_error or "upstream_error",
                        request_id=request_id)
            raise ConnectError("token_exchange_failed", f"connect flow failed: {exc.message}") from None
        self.store.put(user_id, server.key, credential, status=CredentialStatus.CONNECTED)
        self._audit(Outcome.SUCCESS, user_id, server_name, request_id=request_id)
        return ConnectResult(user_id, server_name)

    def disconnect(self, user_id: str, server_name: str, request_id: str | None = None) -> bool:
        """Revoke upstream (RFC 7009) where configured, then delete locally.

        Serialized with flights by the row's lease: a refresh in progress
        finishes (and stores its rotated token) first, so what is revoked is the
        live token, and only the version read is deleted. A failed revocation is
        logged and audited; the local delete still happens.
        """
        server = self.servers.get_server(server_name)
        # Audited with the server's own method: removing an entra_obo credential is not a connect.
        method = "connect" if server.mode is Mode.OAUTH_CONNECT else server.mode.value
        owner = "disconnect-" + uuid.uuid4().hex
        for _ in range(4):
            stored = self._lease(user_id, server, owner)
            if stored is None:
                # Absent, or unreadable (nothing to revoke): delete whatever is there.
                return self.store.delete(user_id, server.key)
            try:
                self._revoke(user_id, server, stored, request_id, method)
                deleted = self.store.delete(user_id, server.key, expected_version=stored.version, lease_owner=owner)
            finally:
                try:
                    self.store.release_lease(user_id, server.key, owner)
                except BrokerError:
                    pass  # it expires
            if deleted:
                self._audit(Outcome.SUCCESS, user_id, server_name, action=Action.DISCONNECT, request_id=request_id,
                            method=method)
                return True
            # Reconnected meanwhile (a new version), or our lease lapsed: again, with what is there now.
        raise ServiceUnavailable("the credential kept changing during disconnect; retry")

    def _lease(self, user_id: str, server: ServerConfig, owner: str) -> StoredCredential | None:
        """The current record with its lease held by ``owner``; waits (bounded)
        while a flight holds it. None: no readable record."""
        deadline = self._monotonic() + self.lease_seconds + 1.0
        stored = self.store.get(user_id, server.key)
        while stored is not None:
            take = self.store.take_lease(stored, owner, self.lease_seconds)
            if take.taken:
                return stored
            current = take.current
            if current is not None and current.version == stored.version and current.lease_owner == stored.lease_owner:
                if self._monotonic() >= deadline:
                    raise ServiceUnavailable("a renewal of this credential is in progress; retry the disconnect")
                self._sleep(0.1)
                current = self.store.get(user_id, server.key)
            stored = current
        return None

    def _revoke(self, user_id: str, server: ServerConfig, stored: StoredCredential, request_id: str | None,
                method: str) -> None:
        if not (server.auth_broker.revocation_endpoint or server.auth_broker.issuer):
            return
        try:
            if self.oauth.revoke(server, stored.credential):
                self._audit(Outcome.SUCCESS, user_id, server.name, action=Action.REVOKE, request_id=request_id,
                            method=method)
        except BrokerError as exc:
            reason = getattr(exc, "oauth_error", None) or exc.code
            log.warning("revocation failed for server %s: %s", server.name, reason)
            self._audit(Outcome.FAILURE, user_id, server.name, reason, action=Action.REVOKE, request_id=request_id,
                        method=method)
