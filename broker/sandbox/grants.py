"""The token endpoint's grants: what each one checks and what it issues.

Pure request-in, dict-out logic over :class:`SandboxProvider`; the caller
holds the provider lock, so check-then-mark steps (single-use codes,
refresh-token rotation) are atomic.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable
from typing import Any

from starlette.datastructures import ImmutableMultiDict

from .clientauth import AssertionCheck, ClientCredentials, authenticate
from .errors import OAuthError
from .jwt import JWTError
from .state import SandboxProvider

__all__ = [
    "TOKEN_EXCHANGE",
    "JWT_BEARER",
    "ACCESS_TOKEN_TYPE",
    "JWT_TOKEN_TYPE",
    "handle_token_request",
    "subject_claims",
    "s256",
]

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
_TOKEN_TYPES = frozenset({ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE})
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
ID_JAG_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id-jag"
# PKCE protects the code, and a refresh token is bound to its client: public clients may use these.
_PUBLIC_GRANTS = frozenset({"authorization_code", "refresh_token", "password"})

Form = ImmutableMultiDict[str, Any]
Grant = Callable[[SandboxProvider, str, Form], dict[str, Any]]


def s256(verifier: str) -> str:
    """The RFC 7636 S256 code challenge of ``verifier``."""
    digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _required(form: Form, name: str) -> str:
    value = form.get(name)
    if not value:
        raise OAuthError("invalid_request", f"missing {name}")
    return str(value)


def subject_claims(provider: SandboxProvider, token: str) -> dict[str, Any]:
    """Claims of a valid, unexpired sandbox subject token, else ``invalid_grant``."""
    try:
        claims = provider.decode_token(token)
    except JWTError as exc:
        raise OAuthError("invalid_grant", "subject token is not a valid sandbox token") from exc
    # An upstream access token is not a user's IdP token: refusing it catches a
    # broker that sends the wrong token as the subject.
    if claims.get("token_use") != "subject":
        raise OAuthError("invalid_grant", "token is not a subject token")
    if claims.get("exp", 0) <= provider.now():
        raise OAuthError("invalid_grant", "subject token expired")
    return claims


def _resources(form: Form) -> list[str]:
    resources = [str(r) for r in form.getlist("resource")]
    for resource in resources:
        if "://" not in resource or "#" in resource:
            raise OAuthError("invalid_target", "resource must be an absolute URI without a fragment")
    return resources


def _bearer(provider: SandboxProvider, access_token: str, scope: str, client_id: str = "") -> dict[str, Any]:
    return {
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": provider.ttl_for(client_id),
        "scope": scope,
    }


def _token_exchange(provider: SandboxProvider, client_id: str, form: Form) -> dict[str, Any]:
    if form.get("requested_token_type") == ID_JAG_TOKEN_TYPE:
        return _id_jag(provider, client_id, form)
    subject_token = _required(form, "subject_token")
    if _required(form, "subject_token_type") not in _TOKEN_TYPES:
        raise OAuthError("invalid_request", "unsupported subject_token_type")
    requested = form.get("requested_token_type") or ACCESS_TOKEN_TYPE
    if requested not in _TOKEN_TYPES:
        raise OAuthError("invalid_request", "unsupported requested_token_type")
    resources = _resources(form)
    claims = subject_claims(provider, subject_token)
    aud = [str(a) for a in form.getlist("audience")] or resources or [client_id]
    scope = str(form.get("scope") or "")
    token = provider.mint_access_token(sub=claims["sub"], aud=aud, scope=scope, client_id=client_id)
    provider.count_grant("token_exchange", claims["sub"])
    return {**_bearer(provider, token, scope, client_id), "issued_token_type": requested}


def _id_jag(provider: SandboxProvider, client_id: str, form: Form) -> dict[str, Any]:
    """SEP-990 leg 1: the IdP exchanges the user's token for an ID-JAG for ``audience``."""
    subject_token = _required(form, "subject_token")
    if _required(form, "subject_token_type") not in (ID_TOKEN_TYPE, *_TOKEN_TYPES):
        raise OAuthError("invalid_request", "unsupported subject_token_type")
    audiences = [str(a) for a in form.getlist("audience")]
    if len(audiences) != 1:
        raise OAuthError("invalid_request", "an ID-JAG needs exactly one audience (the upstream issuer)")
    resources = _resources(form)
    claims = subject_claims(provider, subject_token)
    scope = str(form.get("scope") or "")
    jag = provider.mint_id_jag(sub=claims["sub"], aud=audiences[0], resource=resources[0] if resources else None,
                               scope=scope, client_id=client_id)
    provider.count_grant("id_jag", claims["sub"])
    return {"access_token": jag, "token_type": "N_A", "expires_in": 300, "scope": scope,
            "issued_token_type": ID_JAG_TOKEN_TYPE}


def _id_jag_grant(provider: SandboxProvider, client_id: str, form: Form) -> dict[str, Any]:
    """SEP-990 leg 2: RFC 7523 jwt-bearer with an ID-JAG whose ``aud`` is this issuer."""
    try:
        claims = provider.decode_token(_required(form, "assertion"))
    except JWTError as exc:
        raise OAuthError("invalid_grant", "assertion is not a valid ID-JAG") from exc
    if claims.get("token_use") != "id_jag":  # neither OBO (no requested_token_use) nor SEP-990
        raise OAuthError("invalid_request", "requested_token_use must be on_behalf_of, or the assertion an ID-JAG")
    if str(claims.get("aud", "")).rstrip("/") != provider.issuer.rstrip("/"):
        raise OAuthError("invalid_grant", "ID-JAG audience is not this authorization server")
    if claims.get("exp", 0) <= provider.now():
        raise OAuthError("invalid_grant", "ID-JAG expired")
    if claims["jti"] in provider.used_assertion_jtis:
        raise OAuthError("invalid_grant", "ID-JAG already used")
    provider.used_assertion_jtis.add(claims["jti"])
    resource = claims.get("resource")
    token = provider.mint_access_token(sub=claims["sub"], aud=[resource or client_id], scope=claims.get("scope", ""),
                                       client_id=client_id)
    provider.count_grant("id_jag_grant", claims["sub"])
    return _bearer(provider, token, str(claims.get("scope", "")), client_id)


def _jwt_bearer(provider: SandboxProvider, client_id: str, form: Form) -> dict[str, Any]:
    """Entra OBO when ``requested_token_use`` says so, else the SEP-990 ID-JAG grant."""
    if form.get("requested_token_use") is None:
        return _id_jag_grant(provider, client_id, form)
    return _on_behalf_of(provider, client_id, form)


def _obo_audience(scope: str, client_id: str) -> list[str]:
    # Entra derives the audience from the resource part of "api://x/.default".
    for item in scope.split():
        if "/" in item:
            return [item.rsplit("/", 1)[0]]
    return [client_id]


def _on_behalf_of(provider: SandboxProvider, client_id: str, form: Form) -> dict[str, Any]:
    assertion = _required(form, "assertion")
    if form.get("requested_token_use") != "on_behalf_of":
        raise OAuthError("invalid_request", "requested_token_use must be on_behalf_of")
    scope = _required(form, "scope")
    claims = subject_claims(provider, assertion)
    aud = _obo_audience(scope, client_id)
    token = provider.mint_access_token(sub=claims["sub"], aud=aud, scope=scope, client_id=client_id)
    provider.count_grant("obo", claims["sub"])
    return _bearer(provider, token, scope, client_id)


def _authorization_code(provider: SandboxProvider, client_id: str, form: Form) -> dict[str, Any]:
    store = provider.store
    record = store.codes.get(_required(form, "code"))
    if record is None:
        raise OAuthError("invalid_grant", "unknown authorization code")
    if record.used:
        # RFC 6749 §4.1.2: a replayed code revokes what it already issued.
        if record.family_id is not None:
            store.revoke_family(record.family_id)
        raise OAuthError("invalid_grant", "authorization code already used")
    record.used = True
    if record.expires_at <= provider.now():
        raise OAuthError("invalid_grant", "authorization code expired")
    if record.client_id != client_id:
        raise OAuthError("invalid_grant", "code was issued to another client")
    if form.get("redirect_uri") != record.redirect_uri:
        raise OAuthError("invalid_grant", "redirect_uri does not match")
    verifier = str(form.get("code_verifier") or "")
    if not verifier or not hmac.compare_digest(s256(verifier), record.code_challenge):
        raise OAuthError("invalid_grant", "PKCE verification failed")
    aud = _resources(form) or record.resource or [client_id]
    family = store.new_family(client_id=client_id, sub=record.user, scope=record.scope, aud=aud)
    record.family_id = family.family_id
    token = provider.mint_access_token(
        sub=record.user, aud=aud, scope=record.scope, client_id=client_id, family_id=family.family_id
    )
    provider.count_grant("authorization_code", record.user)
    body = _bearer(provider, token, record.scope, client_id)
    if record.offline:  # a profile may withhold it (no offline_access, no access_type=offline)
        refresh = store.new_refresh(family)
        refresh.active_at = provider.clock()
        body["refresh_token"] = refresh.token
    return body


def _refresh_token(provider: SandboxProvider, client_id: str, form: Form) -> dict[str, Any]:
    store = provider.store
    record = store.refresh.get(_required(form, "refresh_token"))
    if record is None:
        raise OAuthError("invalid_grant", "unknown refresh token")
    family = store.families[record.family_id]
    provider.count_presentation(record.token, family.sub)
    if family.client_id != client_id:
        raise OAuthError("invalid_grant", "refresh token was issued to another client")
    if family.revoked:
        raise OAuthError("invalid_grant", "refresh token revoked")
    idle = provider.refresh_idle_seconds
    if idle and not record.used and provider.clock() - record.active_at > idle:
        raise OAuthError("invalid_grant", "refresh token expired from disuse")
    behaviour = provider.behaviour(client_id)
    rotation = provider.rotate_refresh_tokens if behaviour.rotate is None else behaviour.rotate
    grace = provider.refresh_reuse_grace if behaviour.reuse_grace is None else behaviour.reuse_grace
    if rotation and record.used:
        # Auth0's "reuse interval" / Okta's grace period: a client that lost the
        # response to a rotation may present the old token again, briefly.
        if provider.clock() - record.used_at <= grace:
            provider.count_grace_reuse()
        else:
            store.revoke_family(family.family_id)
            provider.count_reuse()
            raise OAuthError("invalid_grant", "refresh token reuse detected; token family revoked")
    scope = family.scope
    if behaviour.refresh_requires_scope and not form.get("scope"):
        raise OAuthError("invalid_request", "scope is required on refresh")  # as Entra v2 documents it
    if form.get("scope"):
        requested = str(form["scope"])
        if not set(requested.split()) <= set(family.scope.split()):
            raise OAuthError("invalid_scope", "scope exceeds the original grant")
        scope = requested
    token = provider.mint_access_token(
        sub=family.sub, aud=family.aud, scope=scope, client_id=client_id, family_id=family.family_id
    )
    body = _bearer(provider, token, scope, client_id)
    if rotation:
        if not record.used:
            record.used = True
            record.used_at = provider.clock()
        rotated = store.new_refresh(family)
        rotated.active_at = provider.clock()
        body["refresh_token"] = rotated.token
        provider.count_rotation()
    else:
        record.active_at = provider.clock()
    provider.count_grant("refresh_token", family.sub)
    return body


def _password(provider: SandboxProvider, client_id: str, form: Form) -> dict[str, Any]:
    username = _required(form, "username")
    _required(form, "password")
    token = provider.issue_subject_token(username)
    provider.count_grant("password", username)
    return {"access_token": token, "token_type": "Bearer", "expires_in": 3600, "scope": str(form.get("scope") or "")}


_GRANTS: dict[str, Grant] = {
    TOKEN_EXCHANGE: _token_exchange,
    JWT_BEARER: _jwt_bearer,
    "authorization_code": _authorization_code,
    "refresh_token": _refresh_token,
    "password": _password,
}


def _check_family_key(provider: SandboxProvider, form: Form, jkt: str | None) -> None:
    """A refresh token bound to a DPoP key is only good with a proof by that key."""
    record = provider.store.refresh.get(str(form.get("refresh_token") or ""))
    if record is None:
        return
    bound = provider.store.families[record.family_id].jkt
    if bound is not None and bound != jkt:
        raise OAuthError("invalid_dpop_proof" if jkt else "invalid_grant",
                         "refresh token is bound to another DPoP key")


def handle_token_request(
    provider: SandboxProvider, presented: ClientCredentials, form: Form, *,
    check_assertion: AssertionCheck | None = None, jkt: str | None = None,
) -> dict[str, Any]:
    """Authenticate the client, run the grant, return the success body or raise OAuthError.

    ``jkt``: the thumbprint of a verified DPoP proof's key; the tokens issued
    are then bound to it.
    """
    grant_type = form.get("grant_type")
    if not grant_type:
        raise OAuthError("invalid_request", "missing grant_type")
    with provider.lock:
        if grant_type == "password" and presented.client_id is None:
            client_id = ""  # the password grant is a test aid: a client is optional
        else:
            client_id = authenticate(presented, provider.clients, allow_public=grant_type in _PUBLIC_GRANTS,
                                     check_assertion=check_assertion)
        grant = _GRANTS.get(str(grant_type))
        if grant is None:
            raise OAuthError("unsupported_grant_type", "grant type not supported")
        if grant_type == "refresh_token":
            _check_family_key(provider, form, jkt)
        body = grant(provider, client_id, form)
        return provider.bind_to_dpop_key(body, jkt) if jkt is not None else body
