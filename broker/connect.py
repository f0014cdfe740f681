"""The per-user OAuth connect flow (authorization code + PKCE S256) and disconnect.

Start binds a fresh state (256 random bits) to the user, the server and a PKCE
verifier. Completion is bound to the user the link was made for, in one of two
modes (README "Security model"):

* gateway mode (``CONNECT_CALLBACK_URL`` set): the authorization server sends
  the browser to the gateway, which authenticates it and calls ``complete``
  with the user it signed in; another user burns the state.
* browser mode (the broker hosts the callback): the link starts at the broker
  (``open``), which binds the state to one browser with a cookie; the callback
  (``callback``) only accepts that browser, parks the code and asks the user to
  confirm the (masked) broker user; ``confirm`` redeems and stores.

Failures before a genuine state is found are not audited (anyone can send
junk to the callback; the API counts them in metrics instead).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlencode

from .audit import Action, AuditSink, Outcome, record_event
from .clock import Clock
from .errors import BrokerError, ConnectUserMismatch, InvalidRequest, InvalidState, ServiceUnavailable, UpstreamError
from .models import Credential, CredentialStatus, StoredCredential
from .oauth.pkce import new_state, new_verifier
from .secret import Secret
from .servers import Mode, ServerConfig, ServerRegistry
from .state import StateStore
from .store import CredentialStore

__all__ = ["ConnectFlow", "ConnectStart", "ConnectResult", "ConnectError", "ConfirmPrompt", "OpenedLink",
           "OAuthPort", "mask_user", "pair_group"]

log = logging.getLogger(__name__)

_MAX_STATE = 512
_MAX_CODE = 2048


class OAuthPort(Protocol):
    """What the connect flow and resolver need from an authorization-server client."""

    def mint(self, server: ServerConfig, subject_token: Secret, *, retry: bool = True) -> Credential: ...
    def redeem_code(self, server: ServerConfig, code: str, verifier: str, redirect_uri: str) -> Credential: ...
    def refresh(self, server: ServerConfig, credential: Credential, *, retry: bool = True) -> Credential: ...
    def revoke(self, server: ServerConfig, credential: Credential) -> bool: ...
    def authorize_url(self, server: ServerConfig, state: str, verifier: str, redirect_uri: str) -> str: ...


class ConnectError(BrokerError):
    """Raised when a browser connect step cannot complete; ``reason`` is coarse."""

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


@dataclass(frozen=True)
class OpenedLink:
    """Browser mode: where to send the browser, and the cookie binding it."""

    authorize_url: str
    cookie_value: str
    max_age: int


@dataclass(frozen=True)
class ConfirmPrompt:
    """Browser mode: what the confirmation page shows (never the code)."""

    server: str
    masked_user: str


def mask_user(user_id: str) -> str:
    """Enough of a broker user id to recognise one's own, not to learn another's."""
    local, at, domain = user_id.partition("@")
    if len(local) <= 2:
        masked = "*" * len(local) or "*"
    else:
        masked = local[0] + "*" * min(len(local) - 2, 6) + local[-1]
    return masked + (at + domain if at else "")


def pair_group(user_id: str, server_key: str) -> str:
    """The id under which the live states of one (user, server) are capped."""
    return hashlib.sha256(user_id.encode() + b"\x00" + server_key.encode()).hexdigest()


def _digest(cookie_value: str) -> str:
    return hashlib.sha256(cookie_value.encode()).hexdigest()


class ConnectFlow:
    """Start, complete and undo a user's connection to an oauth_connect server.

    ``open_url`` None means gateway mode: ``callback_url`` is the gateway's and
    only ``complete`` finishes a flow.
    """

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
        open_url: str | None = None,
        states_per_pair: int = 5,
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
        self.open_url = open_url
        self.states_per_pair = states_per_pair

    @property
    def gateway_mode(self) -> bool:
        return self.open_url is None

    def _audit(self, outcome: Outcome, user_id: str | None, server: str | None, reason: str | None = None,
               action: Action = Action.CONNECT, request_id: str | None = None, method: str = "connect") -> None:
        record_event(self.audit, self.clock.now(), action, outcome, user_id=user_id, server=server,
                     method=method, reason=reason, request_id=request_id)

    # -- start -----------------------------------------------------------------------

    def start(self, user_id: str, server_name: str) -> ConnectStart:
        """A fresh state and verifier; past the per-pair cap the oldest state is evicted."""
        server = self.servers.get_server(server_name)
        if server.mode is not Mode.OAUTH_CONNECT:
            raise InvalidRequest(f"server: does not use the connect flow (mode {server.mode.value})")
        if not self.store.enabled:
            self.store.get(user_id, server.key)  # raises StoreDisabled, clearly, before a user consents
        state, verifier = new_state(), new_verifier()
        expires_at = self.clock.now() + timedelta(seconds=self.ttl)
        self.states.put(state, {"u": user_id, "s": server.name, "k": server.key, "v": verifier,
                                "exp": expires_at.timestamp()}, self.ttl,
                        group=pair_group(user_id, server.key), cap=self.states_per_pair)
        if self.open_url is not None:
            if server.auth_broker.discover is not None:
                # Added by URL: discover and register now (once, deployment-wide), so a
                # link is handed out only for a server that can be used.
                self.oauth.authorize_url(server, state, verifier, self.callback_url)
            return ConnectStart(f"{self.open_url}?{urlencode({'state': state})}", expires_at)
        return ConnectStart(self.oauth.authorize_url(server, state, verifier, self.callback_url), expires_at)

    def discard_pending(self, user_id: str) -> int:
        """Drop every live state of the user (erasure), for every configured server."""
        return sum(self.states.discard_group(pair_group(user_id, self.servers[n].key)) for n in self.servers)

    # -- shared checks ---------------------------------------------------------------

    def _live(self, data: dict[str, Any] | None, request_id: str | None) -> tuple[dict[str, Any], ServerConfig]:
        """The state's data and server, or InvalidState/ConnectError (audited once genuine)."""
        if data is None:
            raise InvalidState()
        user_id, server_name = str(data["u"]), str(data["s"])
        if self.clock.now().timestamp() > float(data["exp"]):
            self._audit(Outcome.FAILURE, user_id, server_name, "expired_state", request_id=request_id)
            raise InvalidState("connect state expired; start the connection again")
        server = self.servers.get(server_name)
        if server is None or server.key != data["k"]:
            # The server was removed or its URL changed since the flow started.
            self._audit(Outcome.FAILURE, user_id, server_name, "server_changed", request_id=request_id)
            raise ConnectError("server_changed", "connect flow failed: server configuration changed; start again")
        return data, server

    def _redeem_and_store(self, data: dict[str, Any], server: ServerConfig, code: str,
                          request_id: str | None) -> ConnectResult:
        user_id = str(data["u"])
        try:
            credential = self.oauth.redeem_code(server, code, str(data["v"]), self.callback_url)
        except UpstreamError as exc:
            self._audit(Outcome.FAILURE, user_id, server.name, exc.oauth_error or "upstream_error",
                        request_id=request_id)
            raise
        self.store.put(user_id, server.key, credential, status=CredentialStatus.CONNECTED)
        self._audit(Outcome.SUCCESS, user_id, server.name, request_id=request_id)
        return ConnectResult(user_id, server.name)

    @staticmethod
    def _well_formed(state: str | None) -> str:
        if not state or len(state) > _MAX_STATE:
            raise InvalidState()
        return state

    # -- gateway mode ------------------------------------------------------------------

    def complete(self, state: str | None, code: str | None, user_id: str,
                 request_id: str | None = None) -> ConnectResult:
        """Gateway mode: the gateway authenticated the browser as ``user_id``.

        A state made for another user is consumed (burned) and nothing is stored.
        """
        data, server = self._live(self.states.take(self._well_formed(state)), request_id)
        if not hmac.compare_digest(str(data["u"]).encode(), user_id.encode()):
            self._audit(Outcome.DENIED, str(data["u"]), server.name, "user_mismatch", request_id=request_id)
            raise ConnectUserMismatch()
        if not code or len(code) > _MAX_CODE:
            raise InvalidRequest("code: must be a non-empty string")
        return self._redeem_and_store(data, server, code, request_id)

    # -- browser mode -----------------------------------------------------------------

    def open(self, state: str | None) -> OpenedLink:
        """Browser mode: bind the state to the browser opening the link, once."""
        if self.gateway_mode:
            raise ConnectError("gateway_mode", "connect flow failed: this deployment completes at the gateway")
        state = self._well_formed(state)
        data, server = self._live(self.states.peek(state), None)
        cookie = secrets.token_urlsafe(32)
        max_age = max(1, int(float(data["exp"]) - self.clock.now().timestamp()))
        if not self.states.bind(state, _digest(cookie), max_age):
            raise ConnectError("link_used", "connect flow failed: this link was already opened; start again")
        url = self.oauth.authorize_url(server, state, str(data["v"]), self.callback_url)
        return OpenedLink(url, cookie, max_age)

    def _bound(self, state: str, cookie: str | None) -> bool:
        expected = self.states.binding(state)
        return bool(cookie) and expected is not None and hmac.compare_digest(expected, _digest(str(cookie)))

    def callback(self, state: str | None, code: str | None = None, error: str | None = None,
                 cookie: str | None = None, request_id: str | None = None) -> ConfirmPrompt:
        """Browser mode: the authorization server's redirect, in the browser that opened the link.

        Nothing is redeemed or stored here: the code is parked (sealed) until the
        user confirms. Another browser (no or another cookie) burns the state.
        """
        if self.gateway_mode:
            raise ConnectError("gateway_mode", "connect flow failed: this deployment completes at the gateway")
        state = self._well_formed(state)
        data, server = self._live(self.states.peek(state), request_id)
        user_id = str(data["u"])
        if not self._bound(state, cookie):
            self.states.take(state)
            self._audit(Outcome.DENIED, user_id, server.name, "browser_mismatch", request_id=request_id)
            raise ConnectError("browser_mismatch",
                               "connect flow failed: this link was opened in another browser; nothing was stored")
        if error:
            self.states.take(state)
            reason = "access_denied" if error == "access_denied" else "authorization_error"
            self._audit(Outcome.DENIED if reason == "access_denied" else Outcome.FAILURE,
                        user_id, server.name, reason, request_id=request_id)
            raise ConnectError(reason, "connect flow failed: consent was denied" if reason == "access_denied" else None)
        if not code or len(code) > _MAX_CODE:
            self.states.take(state)
            self._audit(Outcome.FAILURE, user_id, server.name, "missing_code", request_id=request_id)
            raise ConnectError("missing_code")
        remaining = max(1, int(float(data["exp"]) - self.clock.now().timestamp()))
        self.states.put_code(state, code, remaining)
        return ConfirmPrompt(server.name, mask_user(user_id))

    def confirm(self, state: str | None, cookie: str | None, request_id: str | None = None) -> ConnectResult:
        """Browser mode: the user's confirming click (a POST carrying the cookie)."""
        if self.gateway_mode:
            raise ConnectError("gateway_mode", "connect flow failed: this deployment completes at the gateway")
        state = self._well_formed(state)
        if not self._bound(state, cookie):
            # No state consumed: a cross-site POST without the cookie must not burn the user's link.
            raise ConnectError("browser_mismatch",
                               "connect flow failed: this link was opened in another browser; nothing was stored")
        data, code = self.states.take_with_code(state)
        data, server = self._live(data, request_id)
        if code is None:
            self._audit(Outcome.FAILURE, str(data["u"]), server.name, "missing_code", request_id=request_id)
            raise ConnectError("missing_code")
        try:
            return self._redeem_and_store(data, server, code, request_id)
        except UpstreamError as exc:
            raise ConnectError("token_exchange_failed", f"connect flow failed: {exc.message}") from None

    # -- disconnect --------------------------------------------------------------------

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
        cfg = server.auth_broker
        if not (cfg.revocation_endpoint or cfg.issuer or cfg.discover is not None):
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
