"""The built-in provider profiles, as data.

Each row fills endpoints and settings under a server's explicit keys; the
values follow each provider's documentation (linked in ``source`` and in the
README's "Provider profiles" table). Response-shape quirks that need code
live in one module per provider (``github``, ``slack``).
"""

from __future__ import annotations

from types import MappingProxyType

from . import github, slack
from .profile import Profile

__all__ = ["PROFILES"]

_DAY = 86400

_PROFILES = (
    Profile(
        "github",
        {
            "mode": "oauth_connect",
            "authorization_endpoint": "https://github.com/login/oauth/authorize",
            "token_endpoint": "https://github.com/login/oauth/access_token",
            # GitHub App user tokens: 8 h access, a new 6-month refresh token on
            # every refresh (refresh_token_expires_in 15897600), so disuse kills it.
            "refresh_token_idle_seconds": 15_897_600,
        },
        adapter=github.adapt,
        source="https://docs.github.com/en/apps/creating-github-apps/authenticating-with-a-github-app/refreshing-user-access-tokens",
    ),
    Profile(
        "google",
        {
            "mode": "oauth_connect",
            "authorization_endpoint": "https://accounts.google.com/o/oauth2/v2/auth",
            "token_endpoint": "https://oauth2.googleapis.com/token",
            "revocation_endpoint": "https://oauth2.googleapis.com/revoke",
            # Without both, Google issues no refresh token (or none on a re-consent).
            "extra_authorize_params": {"access_type": "offline", "prompt": "consent"},
            # Refresh tokens unused for six months stop working.
            "refresh_token_idle_seconds": 180 * _DAY,
        },
        source="https://developers.google.com/identity/protocols/oauth2/web-server#offline",
    ),
    Profile(
        "microsoft",
        {
            "mode": "oauth_connect",
            "authorization_endpoint": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize",
            "token_endpoint": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
            # Entra v2 expects the scopes on the refresh grant.
            "refresh_scope": "configured",
            "refresh_token_idle_seconds": 90 * _DAY,
        },
        params={"tenant": None},
        connect_scopes=("offline_access",),
        source="https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-auth-code-flow",
    ),
    Profile(
        "slack",
        {
            "mode": "oauth_connect",
            "authorization_endpoint": "https://slack.com/oauth/v2/authorize",
            "token_endpoint": "https://slack.com/api/oauth.v2.access",
            # User-token scopes go in user_scope; scope asks for bot scopes. A
            # profile-only key: the servers file has none for it.
            "authorize_scope_param": "user_scope",
        },
        adapter=slack.adapt,
        source="https://docs.slack.dev/authentication/using-token-rotation",
    ),
    Profile(
        "atlassian",
        {
            "mode": "oauth_connect",
            "authorization_endpoint": "https://auth.atlassian.com/authorize",
            "token_endpoint": "https://auth.atlassian.com/oauth/token",
            "extra_authorize_params": {"audience": "api.atlassian.com", "prompt": "consent"},
            # Rotating refresh tokens expire after 90 days of inactivity.
            "refresh_token_idle_seconds": 90 * _DAY,
        },
        connect_scopes=("offline_access",),
        source="https://developer.atlassian.com/cloud/oauth/getting-started/refresh-tokens",
    ),
    Profile(
        "gitlab",
        {
            "mode": "oauth_connect",
            "authorization_endpoint": "{base_url}/oauth/authorize",
            "token_endpoint": "{base_url}/oauth/token",
            "revocation_endpoint": "{base_url}/oauth/revoke",
        },
        params={"base_url": "https://gitlab.com"},
        source="https://docs.gitlab.com/api/oauth2/",
    ),
    Profile(
        "okta",
        {
            "mode": "oauth_connect",
            # The "default" custom authorization server; another one: give issuer or endpoints.
            "authorization_endpoint": "https://{domain}/oauth2/default/v1/authorize",
            "token_endpoint": "https://{domain}/oauth2/default/v1/token",
            "revocation_endpoint": "https://{domain}/oauth2/default/v1/revoke",
        },
        params={"domain": None},
        connect_scopes=("offline_access",),
        source="https://developer.okta.com/docs/guides/refresh-tokens/refresh-token-rotation/",
    ),
    Profile(
        "auth0",
        {
            "mode": "oauth_connect",
            "authorization_endpoint": "https://{domain}/authorize",
            "token_endpoint": "https://{domain}/oauth/token",
            "revocation_endpoint": "https://{domain}/oauth/revoke",
        },
        params={"domain": None},
        connect_scopes=("offline_access",),
        source="https://auth0.com/docs/secure/tokens/refresh-tokens/configure-refresh-token-rotation",
    ),
    Profile(
        "keycloak",
        {
            "mode": "token_exchange",
            "authorization_endpoint": "{base_url}/realms/{realm}/protocol/openid-connect/auth",
            "token_endpoint": "{base_url}/realms/{realm}/protocol/openid-connect/token",
            "revocation_endpoint": "{base_url}/realms/{realm}/protocol/openid-connect/revoke",
        },
        params={"base_url": None, "realm": None},
        source="https://www.keycloak.org/securing-apps/token-exchange",
    ),
)

PROFILES = MappingProxyType({profile.name: profile for profile in _PROFILES})
