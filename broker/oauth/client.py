"""The OAuth port the resolver uses: mint, redeem, refresh, revoke, authorize URL.

Composes the pure builders and parsers with one sender. The clock is read
once per call, before the request, so expiries err early.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from ..clock import Clock, SystemClock
from ..dpop import DPoPKey, dpop_proof
from ..errors import ConfigError, NotConnected, UpstreamError
from ..models import Credential, ObtainedVia
from ..providers import response_adapter
from ..secret import Secret
from ..servers import AuthBrokerConfig, ClientAuth, Mode, ServerConfig
from . import forms
from .discovery import MetadataCache, resolve_endpoints
from .mcp_discovery import Discovered, Registered, discover, parse_registration, registration_body
from .forms import TokenRequest
from .pkce import s256_challenge
from .responses import parse_token_response
from .sender import TokenEndpointSender

if TYPE_CHECKING:
    from ..registrations import ClientRegistration, RegistrationStore

__all__ = ["OAuthClient", "OnCall", "call_result", "with_registration"]

log = logging.getLogger(__name__)

# on_call(grant, result): grant is TokenRequest.grant ("token_exchange",
# "entra_obo", "authorization_code", "refresh_token", "revocation"); result
# is one of a bounded set (see call_result), safe as a metrics label.
OnCall = Callable[[str, str], None]


def call_result(error: UpstreamError | None) -> str:
    """A bounded metrics label for one provider call's outcome.

    ``success``; the allow-listed OAuth error code; else ``network``,
    ``http_4xx`` or ``http_5xx``.
    """
    if error is None:
        return "success"
    if error.oauth_error:
        return error.oauth_error
    if error.status is None:
        return "network"
    return f"http_{error.status // 100}xx"


def _bound(credential: Credential, key: DPoPKey, status: int) -> Credential:
    """The credential with its DPoP key; a server that issued a Bearer token
    instead ignored the proof, and that token would be refused as DPoP."""
    if credential.token_type.lower() != "dpop":
        raise UpstreamError("authorization server did not bind the token to the DPoP key "
                            "(token_type is not DPoP)", status=status)
    return credential.with_changes(dpop_key=key, token_type="DPoP")


class OAuthClient:
    """Acquires, renews and revokes per-user credentials at authorization servers.

    Every failure is an UpstreamError carrying only a status and an
    allow-listed OAuth code; ``error.retryable`` tells the caller whether a
    later attempt may succeed.
    """

    def __init__(
        self,
        sender: TokenEndpointSender,
        metadata: MetadataCache | None = None,
        clock: Clock | None = None,
        *,
        on_call: OnCall | None = None,
        registrations: RegistrationStore | None = None,
        redirect_uri: str | None = None,
        client_metadata_url: str | None = None,
    ) -> None:
        # Our Client ID Metadata Document (served by the API), used where a server supports it.
        self._client_metadata_url = client_metadata_url
        self._sender = sender
        # ``discover: mcp`` servers: their discovered endpoints and registered client.
        self._registrations = registrations
        self._redirect_uri = redirect_uri
        # None still discovers (servers may name only an issuer), with a private cache.
        self._metadata = metadata if metadata is not None else MetadataCache()
        self._clock = clock or SystemClock()
        self._on_call = on_call
        # Servers already warned about tokens of unknown lifetime (once each per process).
        self._no_expiry_warned: set[str] = set()
        self._warn_lock = threading.Lock()

    def endpoints(self, server: ServerConfig, also: tuple[str, ...] = ()) -> AuthBrokerConfig:
        """The server's auth_broker config with discovered endpoints (and client) filled in."""
        if server.auth_broker.discover is not None:
            return with_registration(server.auth_broker, self.registration(server))
        return resolve_endpoints(server.auth_broker, self._sender.get, self._metadata, also=also)

    def registration(self, server: ServerConfig) -> ClientRegistration:
        """Discovery and dynamic registration, once per server deployment-wide, then reused."""
        if self._registrations is None or self._redirect_uri is None:
            raise ConfigError(f"server {server.name!r}: discover: mcp needs the credential store and PUBLIC_URL")
        return self._registrations.get_or_register(server.key, lambda: self._register(server))

    def discover(self, url: str) -> Discovered:
        """Only the discovery half (``credbroker servers discover URL``)."""
        return discover(url, self._sender.get)

    def _register(self, server: ServerConfig) -> tuple[Discovered, Registered]:
        found = discover(server.url, self._sender.get)
        if found.client_id_metadata_document_supported and self._client_metadata_url:
            # The URL is the client id; the server fetches the document. No registration, no secret.
            log.info("identifying by client ID metadata document server=%s", server.name)
            return found, Registered(self._client_metadata_url, None, "none")
        if not found.registration_endpoint:
            raise UpstreamError("authorization server offers no dynamic client registration")
        assert self._redirect_uri is not None
        body = registration_body(found, self._redirect_uri, server.auth_broker.scopes or found.scopes_supported)
        status, _headers, raw = self._sender.post_json(found.registration_endpoint, body)
        client = parse_registration(status, raw, str(body["token_endpoint_auth_method"]))
        log.info("registered a client server=%s host=%s", server.name, self._host(found.registration_endpoint))
        return found, client

    @staticmethod
    def _host(url: str) -> str:
        from urllib.parse import urlsplit
        return urlsplit(url).hostname or ""

    def _forget_on_invalid_client(self, server: ServerConfig, exc: UpstreamError) -> None:
        """The server forgot our registered client: the next use registers again."""
        if exc.oauth_error != "invalid_client" or server.auth_broker.discover is None or not self._registrations:
            return
        current = self._registrations.get(server.key)
        if current is not None:
            self._registrations.forget(server.key, current.generation)

    def _record(self, grant: str, error: UpstreamError | None) -> None:
        if self._on_call is None:
            return
        try:
            self._on_call(grant, call_result(error))
        except Exception:  # metrics must never break a mint
            log.exception("on_call hook failed grant=%s", grant)

    def _send(self, req: TokenRequest) -> tuple[int, dict[str, str], bytes]:
        try:
            response = self._sender.send(req)
        except UpstreamError as exc:
            self._record(req.grant, exc)
            raise
        self._record(req.grant, None)
        return response

    def _now(self) -> float:
        return self._clock.now().timestamp()

    def _proof(self, cfg: AuthBrokerConfig, key: DPoPKey | None) -> forms.Proof | None:
        """A proof minter for the token endpoint of a DPoP server (wall clock: one per attempt)."""
        if not cfg.dpop or key is None:
            return None
        url = cfg.token_endpoint or ""
        return lambda nonce: dpop_proof(key, "POST", url, self._now(), nonce=nonce)

    def _token(
        self, server: ServerConfig, cfg: AuthBrokerConfig, req: TokenRequest, *,
        obtained_via: ObtainedVia, scopes: tuple[str, ...], audience: str | None,
        dpop_key: DPoPKey | None = None, retry: bool = True,
    ) -> Credential:
        now = self._clock.now()
        try:
            status, headers, body = self._sender.send(req, max_attempts=None if retry else 1)
            credential = parse_token_response(
                status, headers, body, obtained_via=obtained_via, requested_scopes=scopes,
                now=now, audience=audience, adapt=response_adapter(cfg.provider),
                default_lifetime=cfg.default_lifetime_seconds,
            )
            if dpop_key is not None:
                credential = _bound(credential, dpop_key, status)
        except UpstreamError as exc:
            self._record(req.grant, exc)
            log.warning("token request failed host=%s grant=%s status=%s oauth_error=%s",
                        req.host, req.grant, exc.status, exc.oauth_error)
            raise
        self._record(req.grant, None)
        if credential.expires_at is None:
            self._warn_no_expiry(server)
        return credential

    def _warn_no_expiry(self, server: ServerConfig) -> None:
        # Kept as "no expiry" (today's behaviour), but never silently: the
        # operator should set default_lifetime_seconds for this server.
        with self._warn_lock:
            if server.key in self._no_expiry_warned:
                return
            self._no_expiry_warned.add(server.key)
        log.warning("server=%s: token response has no expires_in and the token no readable expiry; "
                    "treated as never expiring (set auth_broker.default_lifetime_seconds)", server.name)

    def mint(self, server: ServerConfig, subject_token: Secret, *, retry: bool = True) -> Credential:
        """A fresh credential from the user's subject token (token_exchange or entra_obo).

        ``retry=False``: one attempt (the caller keeps a valid credential and
        schedules its own next attempt)."""
        cfg = self.endpoints(server)
        key = DPoPKey.generate() if cfg.dpop else None  # a fresh mint binds a fresh key
        pop = {"now": self._now(), "proof": self._proof(cfg, key)}
        if server.mode == Mode.TOKEN_EXCHANGE:
            req, via = forms.token_exchange_request(cfg, subject_token, **pop), ObtainedVia.TOKEN_EXCHANGE
        elif server.mode == Mode.ENTRA_OBO:
            req, via = forms.obo_request(cfg, subject_token, **pop), ObtainedVia.ENTRA_OBO
        elif server.mode == Mode.IDENTITY_ASSERTION:
            return self._identity_assertion(server, cfg, subject_token, key, retry)
        else:
            raise ConfigError(f"server {server.name!r}: mode {server.mode} cannot mint from a subject token")
        return self._token(server, cfg, req, obtained_via=via, scopes=cfg.scopes,
                           audience=cfg.audience or cfg.resource, dpop_key=key, retry=retry)

    def _identity_assertion(self, server: ServerConfig, cfg: AuthBrokerConfig, subject_token: Secret,
                            key: DPoPKey | None, retry: bool = True) -> Credential:
        """SEP-990: ID-JAG from the IdP, then the jwt-bearer grant upstream; one call, one flight."""
        leg1 = forms.id_jag_request(cfg, subject_token, now=self._now())
        try:
            _status, headers, body = self._sender.send(leg1, max_attempts=None if retry else 1)
            id_jag = parse_token_response(
                200, headers, body, obtained_via=ObtainedVia.IDENTITY_ASSERTION, requested_scopes=cfg.scopes,
                now=self._clock.now(), audience=cfg.audience or cfg.issuer,
            )
        except UpstreamError as exc:
            self._record(leg1.grant, exc)
            log.warning("ID-JAG request failed host=%s status=%s oauth_error=%s", leg1.host, exc.status, exc.oauth_error)
            raise
        self._record(leg1.grant, None)
        leg2 = forms.id_jag_grant_request(cfg, id_jag.access_token, now=self._now(), proof=self._proof(cfg, key))
        return self._token(server, cfg, leg2, obtained_via=ObtainedVia.IDENTITY_ASSERTION, scopes=cfg.scopes,
                           audience=cfg.resource or cfg.audience, dpop_key=key, retry=retry)

    def redeem_code(self, server: ServerConfig, code: str, verifier: str, redirect_uri: str) -> Credential:
        """Exchange a connect-flow authorization code (with its PKCE verifier)."""
        cfg = self.endpoints(server)
        key = DPoPKey.generate() if cfg.dpop else None
        req = forms.authorization_code_request(cfg, code, verifier, redirect_uri, now=self._now(),
                                               proof=self._proof(cfg, key))
        try:
            return self._token(
                server, cfg, req, obtained_via=ObtainedVia.CONNECT_FLOW, scopes=cfg.scopes,
                audience=cfg.audience or cfg.resource, dpop_key=key,
            )
        except UpstreamError as exc:
            self._forget_on_invalid_client(server, exc)
            raise

    def refresh(self, server: ServerConfig, credential: Credential, *, retry: bool = True) -> Credential:
        """Renew with the refresh-token grant.

        A rotated refresh token replaces the old one; when the response has
        none, the old one is kept (RFC 6749 §6 lets the server reuse it).
        No refresh token at all raises NotConnected(reconnect_required)
        without a connect URL; the resolver adds it.
        """
        if credential.refresh_token is None:
            raise NotConnected(reason=NotConnected.RECONNECT_REQUIRED)
        cfg = self.endpoints(server)
        # The refresh token is bound to the key its grant was made with (RFC 9449 section 5).
        key = (credential.dpop_key or DPoPKey.generate()) if cfg.dpop else None
        req = forms.refresh_request(cfg, credential.refresh_token, now=self._now(), proof=self._proof(cfg, key))
        # Without a scope parameter the server grants the original scopes.
        sent_scope = "scope" in req.form
        scopes = cfg.scopes if sent_scope else (credential.scopes or cfg.scopes)
        try:
            renewed = self._token(
                server, cfg, req, obtained_via=credential.obtained_via, scopes=scopes,
                audience=credential.audience or cfg.audience or cfg.resource, dpop_key=key, retry=retry,
            )
        except UpstreamError as exc:
            self._forget_on_invalid_client(server, exc)
            raise
        if renewed.refresh_token is None:
            renewed = renewed.with_changes(refresh_token=credential.refresh_token)
        return renewed

    def revoke(self, server: ServerConfig, credential: Credential) -> bool:
        """Revoke the refresh token, then the access token (RFC 7009).

        Returns False when no revocation endpoint is configured or discovered
        (an issuer without one is looked up first),
        or when the server supports revoking neither token type; True when
        it accepted at least one. Any other failure raises UpstreamError,
        after both tokens were tried, so a failed refresh-token revocation
        still revokes the access token.
        """
        cfg = self.endpoints(server, also=("revocation_endpoint",))
        if not cfg.revocation_endpoint:
            return False
        tokens = [(credential.refresh_token, "refresh_token"), (credential.access_token, "access_token")]
        revoked = False
        first_error: UpstreamError | None = None
        for token, hint in tokens:
            if token is None:
                continue
            req = forms.revocation_request(cfg, token, hint, now=self._now())
            try:
                self._send(req)
            except UpstreamError as exc:
                if exc.oauth_error == "unsupported_token_type":
                    continue
                log.warning("revocation failed host=%s hint=%s status=%s oauth_error=%s",
                            req.host, hint, exc.status, exc.oauth_error)
                first_error = first_error or exc
            else:
                revoked = True
        if first_error is not None:
            raise first_error
        return revoked

    def authorize_url(self, server: ServerConfig, state: str, verifier: str, redirect_uri: str) -> str:
        """The consent URL for the connect flow, with the verifier's S256 challenge."""
        cfg = self.endpoints(server)
        return forms.authorize_url(cfg, state, s256_challenge(verifier), redirect_uri)



def with_registration(cfg: AuthBrokerConfig, reg: ClientRegistration) -> AuthBrokerConfig:
    """A ``discover: mcp`` config completed by its discovery and registered client."""
    found, client = reg.discovered, reg.client
    auth = ClientAuth.CLIENT_SECRET_BASIC if client.auth_method == "client_secret_basic" and client.client_secret \
        else ClientAuth.CLIENT_SECRET_POST
    return replace(
        cfg, issuer=found.issuer, authorization_endpoint=found.authorization_endpoint,
        token_endpoint=found.token_endpoint, revocation_endpoint=found.revocation_endpoint,
        client_id=client.client_id, client_secret=Secret(client.client_secret) if client.client_secret else None,
        client_auth=auth, resource=found.resource, scopes=cfg.scopes or found.scopes_supported,
    )
