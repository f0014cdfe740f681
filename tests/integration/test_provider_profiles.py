"""Each provider profile against the sandbox playing that provider, over real HTTP.

The servers file names the profile and overrides only the endpoints (to the
sandbox's loopback URL), so everything else the profile fills is what meets
the provider: authorize-URL extras, scope on refresh, the response adapter.
The sandbox client for profile P behaves as P documents (``sandbox.profiles``);
what it received and answered is the assertion.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from broker.audit import MemoryAuditSink
from broker.clock import FakeClock
from broker.errors import UpstreamError
from broker.models import Credential, ObtainedVia
from broker.oauth import OAuthClient
from broker.oauth.pkce import new_state, new_verifier
from broker.resolver import Resolver
from sandbox import SandboxHandle, run_sandbox
from broker.secret import Secret
from broker.servers import ServerConfig, ServerRegistry, parse_servers
from broker.store import CredentialStore
from tests.integration.oauth_harness import RegisteringProvider, store  # noqa: F401 - fixture
from tests.integration.test_oauth_sandbox import browser_get
from tests.secrets import canary, register

pytestmark = pytest.mark.integration

REDIRECT_URI = "http://127.0.0.1:9/v1/connect/callback"
PROFILES = ("github", "google", "microsoft", "slack", "atlassian", "gitlab", "okta", "auth0", "keycloak")
# Template parameters, given as a real servers file would; unused here because
# every endpoint is explicit, which must not be an error.
PARAMS: dict[str, dict[str, str]] = {
    "microsoft": {"tenant": "contoso.onmicrosoft.com"},
    "okta": {"domain": "acme.okta.com"},
    "auth0": {"domain": "acme.eu.auth0.com"},
    "keycloak": {"base_url": "https://sso.example.com", "realm": "acme"},
    "gitlab": {"base_url": "https://git.example.org"},
}


class ProfileProvider(RegisteringProvider):
    """Registers opaque access tokens with the secret guard too."""

    def opaque_for(self, access_token: str) -> str:
        return register(super().opaque_for(access_token))


@pytest.fixture
def secret() -> str:
    return canary("client-secret")


@pytest.fixture
def sandbox(secret: str) -> Iterator[SandboxHandle]:
    names = (*PROFILES, "plain", "no_expires_in")
    provider = ProfileProvider(
        clients={f"{name}-client": secret for name in names},
        client_profiles={f"{name}-client": name for name in names if name != "plain"},
    )
    with run_sandbox(provider) as handle:
        yield handle
    with provider.lock:
        for token in [*provider.store.refresh, *provider.store.codes]:
            register(token)


def server(sandbox: SandboxHandle, secret: str, provider: str | None, client: str | None = None,
           **auth: Any) -> ServerConfig:
    """A server naming ``provider`` with only the endpoints (and client) overridden to the sandbox."""
    block: dict[str, Any] = {
        "token_endpoint": f"{sandbox.url}/token", "authorization_endpoint": f"{sandbox.url}/authorize",
        "revocation_endpoint": f"{sandbox.url}/revoke",
        "client_id": f"{client or provider}-client", "client_secret": secret, **PARAMS.get(provider or "", {}),
    }
    if provider:
        block["provider"] = provider
    block.update(auth)
    block = {k: v for k, v in block.items() if v is not None}
    return parse_servers({"servers": [{"name": "svc", "url": "https://svc.example/mcp", "auth_broker": block}]})["svc"]


def consent(oauth: OAuthClient, svc: ServerConfig, user: str = "erin") -> tuple[dict[str, list[str]], str, str]:
    """The browser's trip: the authorize URL's query, then the code (or the error) it came back with."""
    verifier, state = new_verifier(), new_state()
    url = oauth.authorize_url(svc, state, verifier, REDIRECT_URI)
    status, location = browser_get(f"{url}&consent=approve&user={user}")
    assert status == 302
    back = parse_qs(urlsplit(location).query)
    assert back["state"] == [state]
    if "code" in back:
        return parse_qs(urlsplit(url).query), register(back["code"][0]), verifier
    return parse_qs(urlsplit(url).query), "", back["error"][0]


def connect(oauth: OAuthClient, svc: ServerConfig, user: str = "erin") -> tuple[dict[str, list[str]], Credential]:
    query, code, verifier = consent(oauth, svc, user)
    assert code, "the sandbox refused the authorization request"
    return query, oauth.redeem_code(svc, code, verifier, REDIRECT_URI)


def refresh_forms(sandbox: SandboxHandle) -> list[dict[str, Any]]:
    return [r["form"] for r in sandbox.provider.requests("token") if r["grant_type"] == "refresh_token"]


def test_github_rotates_and_its_200_errors_are_invalid_grant(sandbox: SandboxHandle, oauth: OAuthClient,
                                                           secret: str, clock: FakeClock) -> None:
    svc = server(sandbox, secret, "github", scopes=["repo"])
    _, first = connect(oauth, svc)
    assert first.expires_at == clock.now() + timedelta(hours=8) and first.token_type == "Bearer"
    second = oauth.refresh(svc, first)
    assert second.refresh_token != first.refresh_token and second.access_token != first.access_token
    # The old refresh token again: GitHub answers 200 {"error": "bad_refresh_token"}.
    with pytest.raises(UpstreamError) as info:
        oauth.refresh(svc, first)
    assert (info.value.status, info.value.oauth_error, info.value.retryable) == (200, "invalid_grant", False)
    assert sandbox.provider.stats()["errors"] == {"invalid_grant": 1}


def test_google_asks_offline_consent_and_keeps_its_refresh_token(sandbox: SandboxHandle, oauth: OAuthClient,
                                                                 secret: str) -> None:
    svc = server(sandbox, secret, "google", scopes=["openid"])
    query, first = connect(oauth, svc)
    assert (query["access_type"], query["prompt"]) == (["offline"], ["consent"])
    renewed = first
    for _ in range(3):
        renewed = oauth.refresh(svc, renewed)
        assert renewed.refresh_token == first.refresh_token  # Google sends none back: the old one is kept
    assert all(f["refresh_token"] == first.refresh_token.reveal() for f in refresh_forms(sandbox))
    stats = sandbox.provider.stats()
    assert (stats["grants"]["refresh_token"], stats["refresh_rotations"]) == (3, 0)
    # Dropping the profile's access_type (explicit null) shows why it is there: no refresh token.
    _, online = connect(oauth, server(sandbox, secret, "google", extra_authorize_params={"access_type": None}))
    assert online.refresh_token is None


def test_microsoft_sends_scope_with_offline_access_on_refresh(sandbox: SandboxHandle, oauth: OAuthClient,
                                                              secret: str) -> None:
    svc = server(sandbox, secret, "microsoft", scopes=["User.Read"])
    query, first = connect(oauth, svc)
    assert query["scope"] == ["User.Read offline_access"]
    second = oauth.refresh(svc, first)
    assert second.refresh_token != first.refresh_token
    assert [f.get("scope") for f in refresh_forms(sandbox)] == ["User.Read offline_access"]
    # With the scope omitted (overriding the profile), Entra v2 refuses the refresh.
    with pytest.raises(UpstreamError) as info:
        oauth.refresh(server(sandbox, secret, "microsoft", scopes=["User.Read"], refresh_scope="omit"), second)
    assert (info.value.status, info.value.oauth_error) == (400, "invalid_request")


def test_microsoft_obo_mints_from_the_users_token(sandbox: SandboxHandle, oauth: OAuthClient, secret: str) -> None:
    svc = server(sandbox, secret, "microsoft", mode="entra_obo", scopes=["api://svc/.default"])
    subject = Secret(sandbox.provider.issue_subject_token("erin"))
    credential = oauth.mint(svc, subject)
    assert credential.obtained_via is ObtainedVia.ENTRA_OBO and credential.audience is None
    (form,) = [r["form"] for r in sandbox.provider.requests("token")]
    assert form["scope"] == "api://svc/.default"  # offline_access is for connect only


def test_slack_user_token_from_authed_user_and_ok_false_errors(sandbox: SandboxHandle, oauth: OAuthClient,
                                                               secret: str, clock: FakeClock) -> None:
    svc = server(sandbox, secret, "slack", scopes=["chat:write"])
    query, first = connect(oauth, svc)
    assert query["user_scope"] == ["chat:write"] and "scope" not in query
    assert first.scopes == ("chat:write",) and first.token_type == "Bearer"
    assert first.expires_at == clock.now() + timedelta(hours=12)
    claims = sandbox.provider.decode_token(first.access_token.reveal())
    assert claims["sub"] == "erin"  # the user's token, from authed_user
    second = oauth.refresh(svc, first)
    assert second.refresh_token != first.refresh_token and second.token_type == "Bearer"
    with pytest.raises(UpstreamError) as info:
        oauth.refresh(svc, first)  # reused: Slack says 200 {"ok": false, "error": "invalid_refresh_token"}
    assert (info.value.status, info.value.oauth_error) == (200, "invalid_grant")


def test_atlassian_needs_its_audience_and_rotates(sandbox: SandboxHandle, oauth: OAuthClient, secret: str) -> None:
    svc = server(sandbox, secret, "atlassian", scopes=["read:jira-work"])
    query, first = connect(oauth, svc)
    assert query["audience"] == ["api.atlassian.com"] and query["scope"] == ["read:jira-work offline_access"]
    renewed = first
    for _ in range(3):
        previous, renewed = renewed, oauth.refresh(svc, renewed)
        assert renewed.refresh_token != previous.refresh_token
    assert all("scope" not in f for f in refresh_forms(sandbox))
    # Without the audience (dropped explicitly), Atlassian refuses the authorization request.
    _, code, error = consent(oauth, server(sandbox, secret, "atlassian", extra_authorize_params={"audience": None}))
    assert (code, error) == ("", "invalid_request")


def test_gitlab_rotates_and_revokes(sandbox: SandboxHandle, oauth: OAuthClient, secret: str) -> None:
    svc = server(sandbox, secret, "gitlab", scopes=["read_api"])
    _, first = connect(oauth, svc)
    second = oauth.refresh(svc, first)
    assert second.refresh_token != first.refresh_token
    assert oauth.revoke(svc, second) is True
    with pytest.raises(UpstreamError) as info:
        oauth.refresh(svc, second)
    assert info.value.oauth_error == "invalid_grant"


@pytest.mark.parametrize("provider", ["okta", "auth0"])
def test_rotation_grace_period_accepts_a_lost_rotation_once(provider: str, sandbox: SandboxHandle,
                                                            oauth: OAuthClient, secret: str) -> None:
    svc = server(sandbox, secret, provider, scopes=["openid"])
    query, first = connect(oauth, svc)
    assert query["scope"] == ["openid offline_access"]
    oauth.refresh(svc, first)  # its answer "lost": the broker still holds first
    retried = oauth.refresh(svc, first)
    assert retried.refresh_token != first.refresh_token
    stats = sandbox.provider.stats()
    assert (stats["grace_reuses"], stats["reuse_detected"], stats["refresh_rotations"]) == (1, 0, 2)
    assert oauth.refresh(svc, retried).refresh_token is not None  # the family is still alive


def test_keycloak_exchanges_the_users_token(sandbox: SandboxHandle, oauth: OAuthClient, secret: str) -> None:
    svc = server(sandbox, secret, "keycloak", audience="svc-api", authorization_endpoint=None)
    subject = Secret(sandbox.provider.issue_subject_token("erin"))
    first, second = oauth.mint(svc, subject), oauth.mint(svc, subject)
    assert first.obtained_via is ObtainedVia.TOKEN_EXCHANGE and first.access_token != second.access_token
    forms = [r["form"] for r in sandbox.provider.requests("token")]
    assert [f["grant_type"] for f in forms] == ["urn:ietf:params:oauth:grant-type:token-exchange"] * 2
    assert sandbox.provider.decode_token(first.access_token.reveal())["aud"] == "svc-api"


# -- no expires_in, and a strict refresh scope --------------------------------------------------


def test_no_expires_in_uses_default_lifetime_and_keeps_the_refresh_token(
        sandbox: SandboxHandle, oauth: OAuthClient, secret: str, clock: FakeClock) -> None:
    svc = server(sandbox, secret, None, client="no_expires_in", mode="oauth_connect", default_lifetime_seconds=5400)
    _, first = connect(oauth, svc)
    assert first.access_token.reveal().startswith("sbx_at_")  # opaque: no exp to read
    assert first.expires_at == clock.now() + timedelta(seconds=5400)
    clock.advance(3600)
    second = oauth.refresh(svc, first)
    assert second.expires_at == clock.now() + timedelta(seconds=5400)
    assert second.refresh_token == first.refresh_token
    assert oauth.revoke(svc, second) is True
    assert sandbox.provider.stats()["revocations"] == 2  # the refresh token, then the opaque access token


def test_no_expires_in_without_default_is_warned_once(sandbox: SandboxHandle, oauth: OAuthClient, secret: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="broker.oauth.client")
    svc = server(sandbox, secret, None, client="no_expires_in", mode="oauth_connect")
    _, first = connect(oauth, svc)
    assert oauth.refresh(svc, first).expires_at is None and first.expires_at is None
    assert len([r for r in caplog.records if "default_lifetime_seconds" in r.getMessage()]) == 1


def test_narrowed_grant_refreshes_with_scope_omitted_but_not_with_configured_scope(
        sandbox: SandboxHandle, oauth: OAuthClient, secret: str, store: CredentialStore,  # noqa: F811
        clock: FakeClock) -> None:
    """The issue's finding: the server granted less than configured and checks refresh scope."""
    sandbox.provider.configure(grantable_scopes=["openid", "repo"], access_token_ttl=100)
    scopes = ["openid", "offline_access", "repo"]
    svc = server(sandbox, secret, None, client="plain", mode="oauth_connect", scopes=scopes)
    _, credential = connect(oauth, svc)
    assert credential.scopes == ("openid", "repo")
    store.put("erin", svc.key, credential)
    resolver = Resolver(ServerRegistry([svc]), store, oauth, MemoryAuditSink(), clock)
    seen = {credential.access_token.reveal()}
    for _ in range(5):
        clock.advance(41)  # past the refresh point of a 100 s token
        seen.add(resolver.resolve("erin", "svc").value.reveal().removeprefix("Bearer "))
    assert len(seen) == 6  # five refreshes, five new tokens
    forms = refresh_forms(sandbox)
    assert len(forms) == 5 and all("scope" not in f for f in forms)
    configured = server(sandbox, secret, None, client="plain", mode="oauth_connect", scopes=scopes,
                        refresh_scope="configured")
    current = store.get("erin", svc.key)
    assert current is not None
    with pytest.raises(UpstreamError) as info:
        oauth.refresh(configured, current.credential)
    assert (info.value.status, info.value.oauth_error) == (400, "invalid_scope")


def test_sandbox_refuses_an_unknown_profile() -> None:
    with pytest.raises(ValueError, match="unknown sandbox profile"):
        RegisteringProvider(client_profiles={"c": "githb"})
    provider = RegisteringProvider()
    with pytest.raises(ValueError, match="unknown sandbox profile"):
        provider.configure(client_profiles={"c": "nope"})
    provider.configure(client_profiles={"c": "slack"}, grantable_scopes=["a"])
    assert provider.behaviour("c").slack_envelope and provider.grant_scope("a b") == "a"
