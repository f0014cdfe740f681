"""Pure request builders for the token, revocation and authorization endpoints.

No I/O here: each builder turns an ``AuthBrokerConfig`` (endpoints already
resolved) and secrets into a ``TokenRequest`` that the sender POSTs, so every
field is tested without a network. Client authentication is applied in one
place, ``_authenticate``.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from ..errors import ConfigError
from ..secret import Secret
from ..servers import AuthBrokerConfig, ClientAuth, RefreshScope
from .assertion import CLIENT_ASSERTION_TYPE, client_assertion

__all__ = [
    "TokenRequest",
    "Proof",
    "GRANT_TOKEN_EXCHANGE",
    "GRANT_JWT_BEARER",
    "GRANT_AUTHORIZATION_CODE",
    "GRANT_REFRESH_TOKEN",
    "ACCESS_TOKEN_TYPE",
    "token_exchange_request",
    "obo_request",
    "authorization_code_request",
    "refresh_request",
    "revocation_request",
    "id_jag_request",
    "id_jag_grant_request",
    "ID_JAG_TOKEN_TYPE",
    "ID_TOKEN_TYPE",
    "authorize_url",
    "basic_authorization",
]

GRANT_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
GRANT_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GRANT_AUTHORIZATION_CODE = "authorization_code"
GRANT_REFRESH_TOKEN = "refresh_token"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
ID_JAG_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id-jag"

# Given the server's latest DPoP nonce (or None), a fresh proof for this request.
Proof = Callable[[str | None], str]

# Short, bounded labels for logs and metrics (never the form itself).
_GRANT_LABELS = {
    GRANT_TOKEN_EXCHANGE: "token_exchange",
    GRANT_JWT_BEARER: "entra_obo",
    GRANT_AUTHORIZATION_CODE: "authorization_code",
    GRANT_REFRESH_TOKEN: "refresh_token",
}


@dataclass(frozen=True, repr=False)
class TokenRequest:
    """One form POST to an authorization server; holds secrets, so ``repr`` is redacted."""

    url: str
    form: dict[str, str]
    headers: dict[str, str]
    # DPoP servers: mints a fresh proof for each attempt, given the server's
    # latest nonce (or None); the sender calls it, so retries never reuse one.
    proof: Callable[[str | None], str] | None = field(default=None, compare=False)
    # private_key_jwt: a fresh assertion for a retried attempt (each ``jti`` is used once).
    reassert: Callable[[], str] | None = field(default=None, compare=False)

    @property
    def grant(self) -> str:
        """A short label for logs and metrics: the grant, or ``revocation``."""
        grant_type = self.form.get("grant_type")
        if grant_type is None:
            return "revocation" if "token" in self.form else "unknown"
        if grant_type == GRANT_JWT_BEARER and "requested_token_use" not in self.form:
            return "jwt_bearer"  # SEP-990 leg 2, not Entra OBO
        if self.form.get("requested_token_type") == ID_JAG_TOKEN_TYPE:
            return "id_jag"  # SEP-990 leg 1
        return _GRANT_LABELS.get(grant_type, "other")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    def __repr__(self) -> str:
        # Field and header names only: values are tokens, codes and secrets.
        parts = urlsplit(self.url)
        url = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
        return (
            f"TokenRequest(url={url!r}, grant={self.grant!r}, "
            f"form_fields={sorted(self.form)!r}, headers={sorted(self.headers)!r})"
        )

    __str__ = __repr__


def basic_authorization(client_id: str, client_secret: str) -> str:
    """``Basic`` credentials per RFC 6749 §2.3.1: both parts form-urlencoded first.

    ``quote(..., safe="")`` encodes a space as ``%20`` rather than ``+``; both
    decode to the same value under form decoding and under plain percent
    decoding, so it works with servers that implement either.
    """
    raw = f"{quote(client_id, safe='')}:{quote(client_secret, safe='')}"
    return "Basic " + base64.b64encode(raw.encode("utf-8")).decode("ascii")


def _require(value: str | None, field: str) -> str:
    if not value:
        raise ConfigError(f"auth_broker.{field} is not configured (and was not discovered)")
    return value


def _assertion_audience(cfg: AuthBrokerConfig, url: str) -> str:
    if cfg.client_assertion_aud == "issuer":
        return _require(cfg.issuer, "issuer")
    return cfg.token_endpoint or url


def _authenticate(cfg: AuthBrokerConfig, form: dict[str, str], url: str, now: float | None) -> dict[str, str]:
    """Apply the configured client authentication; returns the extra headers.

    - ``client_secret_post``: client_id and client_secret in the form.
    - ``client_secret_basic``: an Authorization header; client_id not in the form.
    - ``private_key_jwt`` (RFC 7523 §2.2): client_id and a fresh signed
      assertion (its own ``jti``, a one-minute ``exp``) in the form.
    - public client (no secret): client_id in the form only.
    """
    headers: dict[str, str] = {}
    secret = cfg.client_secret.reveal() if cfg.client_secret else ""
    if secret and not cfg.client_id:
        raise ConfigError("auth_broker.client_secret is set without auth_broker.client_id")
    if not cfg.client_id:
        return headers  # unauthenticated exchange, e.g. an STS that trusts the network
    if secret and cfg.client_auth == ClientAuth.CLIENT_SECRET_BASIC:
        headers["Authorization"] = basic_authorization(cfg.client_id, secret)
        return headers
    form["client_id"] = cfg.client_id
    if cfg.client_auth == ClientAuth.PRIVATE_KEY_JWT:
        if cfg.client_assertion_key is None:
            raise ConfigError("auth_broker.client_auth is private_key_jwt but no client assertion key is loaded")
        form["client_assertion_type"] = CLIENT_ASSERTION_TYPE
        form["client_assertion"] = client_assertion(
            cfg.client_assertion_key, cfg.client_id, _assertion_audience(cfg, url),
            time.time() if now is None else now,
        )
        return headers
    if secret:
        form["client_secret"] = secret
    return headers


def _token_request(cfg: AuthBrokerConfig, url: str, form: dict[str, str], now: float | None = None,
                   proof: Callable[[str | None], str] | None = None) -> TokenRequest:
    headers = _authenticate(cfg, form, url, now)
    reassert = None
    if "client_assertion" in form:
        key, client_id, aud = cfg.client_assertion_key, form["client_id"], _assertion_audience(cfg, url)
        assert key is not None
        # Retries happen later than ``now``: they read the wall clock.
        reassert = lambda: client_assertion(key, client_id, aud, time.time())  # noqa: E731
    return TokenRequest(url=url, form=form, headers=headers, proof=proof, reassert=reassert)


def _reveal(value: Secret | str) -> str:
    return value.reveal() if isinstance(value, Secret) else value


def token_exchange_request(cfg: AuthBrokerConfig, subject_token: Secret, *, now: float | None = None,
                           proof: Proof | None = None) -> TokenRequest:
    """RFC 8693 token exchange with the user's IdP token as the subject."""
    form = {
        "grant_type": GRANT_TOKEN_EXCHANGE,
        "subject_token": subject_token.reveal(),
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "requested_token_type": cfg.requested_token_type,
    }
    if cfg.resource:
        form["resource"] = cfg.resource  # RFC 8707
    if cfg.audience:
        form["audience"] = cfg.audience
    if cfg.scopes:
        form["scope"] = " ".join(cfg.scopes)
    return _token_request(cfg, _require(cfg.token_endpoint, "token_endpoint"), form, now, proof)


def obo_request(cfg: AuthBrokerConfig, assertion: Secret, *, now: float | None = None,
                proof: Proof | None = None) -> TokenRequest:
    """Microsoft Entra On-Behalf-Of: the user's token as a jwt-bearer assertion."""
    form = {
        "grant_type": GRANT_JWT_BEARER,
        "assertion": assertion.reveal(),
        "requested_token_use": "on_behalf_of",
    }
    if cfg.scopes:
        form["scope"] = " ".join(cfg.scopes)
    return _token_request(cfg, _require(cfg.token_endpoint, "token_endpoint"), form, now, proof)


def id_jag_request(cfg: AuthBrokerConfig, subject_token: Secret, *, now: float | None = None) -> TokenRequest:
    """SEP-990 leg 1: RFC 8693 exchange at the enterprise IdP for an ID-JAG.

    ``audience`` is the upstream authorization server's issuer, ``resource``
    the upstream; the IdP client (``idp_client_id``/``idp_client_secret``)
    authenticates, never the upstream client.
    """
    form = {
        "grant_type": GRANT_TOKEN_EXCHANGE,
        "requested_token_type": ID_JAG_TOKEN_TYPE,
        "subject_token": subject_token.reveal(),
        "subject_token_type": ID_TOKEN_TYPE,
        "audience": _require(cfg.audience or cfg.issuer, "issuer"),
    }
    if cfg.resource:
        form["resource"] = cfg.resource
    if cfg.scopes:
        form["scope"] = " ".join(cfg.scopes)
    # The IdP client authenticates by its secret (or not at all); no DPoP toward the IdP.
    idp = replace(cfg, client_id=cfg.idp_client_id, client_secret=cfg.idp_client_secret,
                  client_auth=ClientAuth.CLIENT_SECRET_POST, client_assertion_key=None)
    return _token_request(idp, _require(cfg.idp_token_endpoint, "idp_token_endpoint"), form, now)


def id_jag_grant_request(cfg: AuthBrokerConfig, id_jag: Secret, *, now: float | None = None,
                         proof: Proof | None = None) -> TokenRequest:
    """SEP-990 leg 2: the RFC 7523 jwt-bearer grant with the ID-JAG at the upstream AS."""
    form = {"grant_type": GRANT_JWT_BEARER, "assertion": id_jag.reveal()}
    if cfg.resource:
        form["resource"] = cfg.resource
    if cfg.scopes:
        form["scope"] = " ".join(cfg.scopes)
    return _token_request(cfg, _require(cfg.token_endpoint, "token_endpoint"), form, now, proof)


def authorization_code_request(
    cfg: AuthBrokerConfig, code: Secret | str, verifier: Secret | str, redirect_uri: str, *,
    now: float | None = None, proof: Proof | None = None,
) -> TokenRequest:
    """Redeem a connect-flow authorization code with its PKCE verifier (RFC 6749 §4.1.3)."""
    form = {
        "grant_type": GRANT_AUTHORIZATION_CODE,
        "code": _reveal(code),
        "redirect_uri": redirect_uri,
        "code_verifier": _reveal(verifier),
    }
    if cfg.resource:
        form["resource"] = cfg.resource
    return _token_request(cfg, _require(cfg.token_endpoint, "token_endpoint"), form, now, proof)


def refresh_request(cfg: AuthBrokerConfig, refresh_token: Secret, *, now: float | None = None,
                    proof: Proof | None = None) -> TokenRequest:
    """Refresh-token grant (RFC 6749 §6).

    ``scope`` is omitted by default: the new token then carries the scope
    originally granted. Sending the configured scopes breaks on servers that
    check them against the grant (``invalid_scope`` from a certified server
    whose consent narrowed them), so it is opt-in per server
    (``refresh_scope: configured``, which Microsoft Entra v2 expects).
    ``resource`` (RFC 8707) is sent when configured.
    """
    form = {"grant_type": GRANT_REFRESH_TOKEN, "refresh_token": refresh_token.reveal()}
    if cfg.scopes and cfg.refresh_scope is RefreshScope.CONFIGURED:
        form["scope"] = " ".join(cfg.scopes)
    if cfg.resource:
        form["resource"] = cfg.resource
    return _token_request(cfg, _require(cfg.token_endpoint, "token_endpoint"), form, now, proof)


def revocation_request(
    cfg: AuthBrokerConfig, token: Secret, token_type_hint: str | None = None, *, now: float | None = None,
) -> TokenRequest:
    """RFC 7009 revocation of one token, authenticated like a token request."""
    form = {"token": token.reveal()}
    if token_type_hint:
        form["token_type_hint"] = token_type_hint
    return _token_request(cfg, _require(cfg.revocation_endpoint, "revocation_endpoint"), form, now)


def authorize_url(cfg: AuthBrokerConfig, state: str, challenge: str, redirect_uri: str) -> str:
    """The URL the user's browser opens to consent (authorization code + PKCE S256).

    Keeps any query the configured endpoint already has (some servers put a
    tenant or policy there), and adds the server's ``extra_authorize_params``.
    """
    endpoint = _require(cfg.authorization_endpoint, "authorization_endpoint")
    params = {"response_type": "code", "client_id": _require(cfg.client_id, "client_id")}
    params.update(
        redirect_uri=redirect_uri,
        state=state,
        code_challenge=challenge,
        code_challenge_method="S256",
    )
    if cfg.scopes:
        params[cfg.authorize_scope_param] = " ".join(cfg.scopes)
    if cfg.resource:
        params["resource"] = cfg.resource
    # Provider extras (Google's access_type=offline, Atlassian's audience);
    # the parser refuses names the broker sets itself.
    params.update(cfg.extra_authorize_params)
    parts = urlsplit(endpoint)
    query = urlencode(params, quote_via=quote)
    query = f"{parts.query}&{query}" if parts.query else query
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
