"""Provider profiles the sandbox can play, per client: how a real provider's
token endpoint and consent differ from plain RFC 6749.

A client registered with a profile (``SandboxProvider(client_profiles=...)``)
gets that provider's behaviour: GitHub's errors with HTTP 200, Slack's
``ok``/``authed_user`` envelope, Google's non-rotating refresh token that is
only issued for ``access_type=offline``, the ``offline_access`` scope that
Entra, Atlassian, Okta and Auth0 require for a refresh token, Entra's scope
on refresh, a rotation grace period, or no ``expires_in`` with opaque tokens.
Pure functions over dicts; the app and the grants call them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse

from .errors import OAuthError

__all__ = ["ProfileBehaviour", "SANDBOX_PROFILES", "behaviour_for", "shape_success", "shape_error",
           "authorize_problem", "issues_refresh_token"]


@dataclass(frozen=True)
class ProfileBehaviour:
    """How one provider deviates from the sandbox's plain behaviour (None: the provider setting)."""

    name: str
    access_token_ttl: int | None = None
    rotate: bool | None = None
    reuse_grace: float | None = None
    errors_with_200: bool = False
    error_names: Mapping[str, str] = field(default_factory=dict)
    slack_envelope: bool = False
    omit_expires_in: bool = False
    opaque_access_tokens: bool = False
    refresh_requires_scope: bool = False
    # A refresh token only when the authorization request had these (Google: access_type=offline).
    offline_params: Mapping[str, str] = field(default_factory=dict)
    # A refresh token only when the granted scope has offline_access.
    offline_scope: bool = False
    # The authorization request must carry these, else invalid_request (Atlassian's audience).
    required_authorize_params: Mapping[str, str] = field(default_factory=dict)
    authorize_scope_param: str = "scope"


_PLAIN = ProfileBehaviour("plain")

SANDBOX_PROFILES: Mapping[str, ProfileBehaviour] = {
    p.name: p
    for p in (
        _PLAIN,
        ProfileBehaviour(
            "github", access_token_ttl=28800, rotate=True, errors_with_200=True,
            error_names={"invalid_grant": "bad_refresh_token", "invalid_client": "incorrect_client_credentials"},
        ),
        ProfileBehaviour("google", access_token_ttl=3599, rotate=False,
                         offline_params={"access_type": "offline"}),
        ProfileBehaviour("microsoft", rotate=True, offline_scope=True, refresh_requires_scope=True),
        ProfileBehaviour(
            "slack", access_token_ttl=43200, rotate=True, slack_envelope=True, authorize_scope_param="user_scope",
            error_names={"invalid_grant": "invalid_refresh_token", "invalid_client": "bad_client_secret"},
        ),
        ProfileBehaviour("atlassian", rotate=True, offline_scope=True,
                         required_authorize_params={"audience": "api.atlassian.com"}),
        ProfileBehaviour("gitlab", access_token_ttl=7200, rotate=True),
        ProfileBehaviour("okta", rotate=True, reuse_grace=30.0, offline_scope=True),
        ProfileBehaviour("auth0", rotate=True, reuse_grace=10.0, offline_scope=True),
        ProfileBehaviour("keycloak", access_token_ttl=300, rotate=True),
        # Salesforce- or Zendesk-like: opaque tokens, no expires_in, refresh token kept.
        ProfileBehaviour("no_expires_in", rotate=False, omit_expires_in=True, opaque_access_tokens=True),
    )
}


def behaviour_for(profiles: Mapping[str, str], client_id: str | None) -> ProfileBehaviour:
    """The behaviour of ``client_id``'s profile; plain for clients without one."""
    name = profiles.get(client_id or "")
    return SANDBOX_PROFILES[name] if name else _PLAIN


def check_profile_name(name: str) -> str:
    if name not in SANDBOX_PROFILES:
        raise ValueError(f"unknown sandbox profile {name!r}; one of {sorted(SANDBOX_PROFILES)}")
    return name


def authorize_problem(behaviour: ProfileBehaviour, params: Mapping[str, str]) -> str | None:
    """Why this authorization request is refused, or None."""
    for name, value in behaviour.required_authorize_params.items():
        if params.get(name) != value:
            return f"{name}={value} is required"
    return None


def issues_refresh_token(behaviour: ProfileBehaviour, params: Mapping[str, str], scope: str) -> bool:
    """Whether a code from this authorization request earns a refresh token."""
    if any(params.get(k) != v for k, v in behaviour.offline_params.items()):
        return False
    return not behaviour.offline_scope or "offline_access" in scope.split()


def shape_success(behaviour: ProfileBehaviour, body: dict[str, Any], grant_type: str) -> dict[str, Any]:
    """The provider's success body from the sandbox's RFC 6749 one."""
    body = dict(body)
    if behaviour.omit_expires_in:
        body.pop("expires_in", None)
    if behaviour.name == "github":
        body["token_type"] = "bearer"
        if "refresh_token" in body:
            body["refresh_token_expires_in"] = 15897600
    if behaviour.slack_envelope:
        token = {**body, "token_type": "user"}
        envelope: dict[str, Any] = {"ok": True, "app_id": "A0SANDBOX", "team": {"id": "T0SANDBOX"}}
        if grant_type == "authorization_code":
            # The user's token nested; a bot token would be at the top level.
            return {**envelope, "authed_user": {"id": "U0SANDBOX", **token}}
        return {**envelope, "authed_user": {"id": "U0SANDBOX"}, **token}
    return body


def shape_error(behaviour: ProfileBehaviour, err: OAuthError, headers: Mapping[str, str]) -> JSONResponse | None:
    """The provider's error answer, or None for the plain RFC 6749 one."""
    name = behaviour.error_names.get(err.error, err.error)
    if behaviour.slack_envelope:
        return JSONResponse({"ok": False, "error": name}, status_code=200, headers=dict(headers))
    if behaviour.errors_with_200:
        body = {"error": name, "error_description": err.description or "", "error_uri": "https://docs.example/"}
        return JSONResponse(body, status_code=200, headers=dict(headers))
    return None
