"""OAuthClient and Resolver against the sandbox provider over real HTTP on loopback.

What the provider *received* is the assertion: exact form fields and client
authentication for RFC 8693, Entra OBO and ``client_secret_basic``; endpoint
discovery from RFC 8414 metadata; refresh with and without rotation, and a
replayed refresh token that makes the provider revoke the whole family.
"""

from __future__ import annotations

from datetime import timedelta
from http.client import HTTPConnection
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from broker.audit import Action, MemoryAuditSink, Outcome
from broker.clock import FakeClock
from broker.errors import NotConnected, UpstreamError
from broker.models import Credential, CredentialStatus, ObtainedVia, SubjectToken
from broker.oauth import (
    MetadataCache,
    OAuthClient,
    TokenEndpointSender,
)
from broker.oauth.pkce import new_state, new_verifier
from broker.resolver import Resolver
from sandbox import (
    ACCESS_TOKEN_TYPE,
    JWT_BEARER,
    TOKEN_EXCHANGE,
    SandboxHandle,
)
from broker.secret import Secret
from broker.servers import ServerRegistry, parse_servers
from broker.store import CredentialStore
from tests.secrets import canary, register

from tests.integration.oauth_harness import (  # noqa: F401 - fixtures
    CALLBACK_URL, RegisteringProvider, client_secret, sandbox, store)

pytestmark = pytest.mark.integration

REDIRECT_URI = "http://127.0.0.1:9/v1/connect/callback"


def registry(sandbox_url: str, client_secret: str, **overrides: dict[str, Any]) -> ServerRegistry:
    """tx, obo and gh (oauth_connect) against the sandbox; ``overrides`` patch auth_broker blocks."""
    ab = {"token_endpoint": f"{sandbox_url}/token", "client_id": "broker-client", "client_secret": client_secret}
    servers = [
        {"name": "tx", "url": "https://tx.upstream.test/mcp",
         "auth_broker": {"mode": "token_exchange", **ab, "audience": "tx-api", "scopes": ["read"]}},
        {"name": "obo", "url": "https://obo.upstream.test/mcp",
         "auth_broker": {"mode": "entra_obo", **ab, "scopes": ["api://obo/.default"]}},
        {"name": "gh", "url": "https://gh.upstream.test/mcp",
         "auth_broker": {"mode": "oauth_connect", **ab, "authorization_endpoint": f"{sandbox_url}/authorize",
                         "revocation_endpoint": f"{sandbox_url}/revoke", "scopes": ["repo"]}},
    ]
    for server in servers:
        if server["name"] in overrides:
            server["auth_broker"] = overrides[server["name"]]
    return parse_servers({"servers": servers})


def make_oauth(http: httpx.Client, clock: Any = None) -> OAuthClient:
    return OAuthClient(TokenEndpointSender(http, retry_seconds=2, max_attempts=2), MetadataCache(), clock)


def browser_get(url: str) -> tuple[int, str]:
    """The user's browser: one GET, no redirect followed.

    Plain http.client, because httpx/httpcore debug logs would print the
    authorization code from the Location header (the guard would rightly object).
    """
    parts = urlsplit(url)
    conn = HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=5)
    try:
        conn.request("GET", f"{parts.path}?{parts.query}")
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("Location") or ""
    finally:
        conn.close()


def connect_directly(oauth: OAuthClient, servers: ServerRegistry, sandbox_url: str, user: str) -> Credential:
    """Authorization code + PKCE without the connect flow: consent, then redeem."""
    server = servers["gh"]
    verifier, state = new_verifier(), new_state()
    url = oauth.authorize_url(server, state, verifier, REDIRECT_URI)
    assert url.startswith(f"{sandbox_url}/authorize?")
    status, location = browser_get(f"{url}&consent=approve&user={user}")
    assert status == 302
    query = parse_qs(urlsplit(location).query)
    assert query["state"] == [state]
    code = register(query["code"][0])
    credential = oauth.redeem_code(server, code, verifier, REDIRECT_URI)
    assert credential.refresh_token is not None
    return credential


# -- token exchange and OBO ------------------------------------------------------


def test_token_exchange_sends_rfc8693_form_with_client_secret_post(sandbox: SandboxHandle, http: httpx.Client,
                                                                   client_secret: str) -> None:
    provider = sandbox.provider
    servers = registry(sandbox.url, client_secret)
    subject = provider.issue_subject_token("alice")

    credential = make_oauth(http).mint(servers["tx"], Secret(subject))

    (request,) = provider.requests("token")
    assert request["client_auth"] == "client_secret_post"
    assert request["form"] == {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "requested_token_type": ACCESS_TOKEN_TYPE,
        "audience": "tx-api",
        "scope": "read",
        "client_id": "broker-client",
        "client_secret": client_secret,
    }
    claims = provider.decode_token(credential.access_token.reveal())
    assert (claims["sub"], claims["aud"], claims["scope"]) == ("alice", "tx-api", "read")
    assert credential.obtained_via is ObtainedVia.TOKEN_EXCHANGE
    assert credential.audience == "tx-api" and credential.scopes == ("read",)
    assert credential.refresh_token is None and credential.expires_at is not None
    assert provider.stats()["grants"]["token_exchange"] == 1


def test_token_exchange_sends_resource_indicator(sandbox: SandboxHandle, http: httpx.Client,
                                                 client_secret: str) -> None:
    servers = registry(sandbox.url, client_secret, tx={
        "mode": "token_exchange", "token_endpoint": f"{sandbox.url}/token", "client_id": "broker-client",
        "client_secret": client_secret, "resource": "https://tx.upstream.test/api"})
    subject = sandbox.provider.issue_subject_token("alice")

    credential = make_oauth(http).mint(servers["tx"], Secret(subject))

    (request,) = sandbox.provider.requests("token")
    assert request["form"]["resource"] == "https://tx.upstream.test/api"
    assert "audience" not in request["form"] and "scope" not in request["form"]
    assert sandbox.provider.decode_token(credential.access_token.reveal())["aud"] == "https://tx.upstream.test/api"


def test_entra_obo_sends_jwt_bearer_form(sandbox: SandboxHandle, http: httpx.Client, client_secret: str) -> None:
    provider = sandbox.provider
    servers = registry(sandbox.url, client_secret)
    subject = provider.issue_subject_token("bob")

    credential = make_oauth(http).mint(servers["obo"], Secret(subject))

    (request,) = provider.requests("token")
    assert request["client_auth"] == "client_secret_post"
    assert request["form"] == {
        "grant_type": JWT_BEARER,
        "assertion": subject,
        "requested_token_use": "on_behalf_of",
        "scope": "api://obo/.default",
        "client_id": "broker-client",
        "client_secret": client_secret,
    }
    claims = provider.decode_token(credential.access_token.reveal())
    assert (claims["sub"], claims["aud"]) == ("bob", "api://obo")
    assert credential.obtained_via is ObtainedVia.ENTRA_OBO
    assert provider.stats()["grants"]["obo"] == 1


def test_client_secret_basic_keeps_reserved_characters(sandbox: SandboxHandle, http: httpx.Client) -> None:
    # RFC 6749 §2.3.1: form-urlencode id and secret before Base64, so ':' '+' '%' survive.
    secret = register(f"{canary('basic')}:/+ %&=")
    sandbox.provider.configure(clients={"broker-client": secret})
    servers = registry(sandbox.url, secret, tx={
        "mode": "token_exchange", "token_endpoint": f"{sandbox.url}/token", "client_id": "broker-client",
        "client_secret": secret, "client_auth": "client_secret_basic", "audience": "tx-api"})
    subject = sandbox.provider.issue_subject_token("carol")

    credential = make_oauth(http).mint(servers["tx"], Secret(subject))

    (request,) = sandbox.provider.requests("token")
    assert request["client_auth"] == "client_secret_basic"
    assert request["client_id"] == "broker-client"
    assert "client_id" not in request["form"] and "client_secret" not in request["form"]
    assert request["form"]["subject_token"] == subject
    assert sandbox.provider.decode_token(credential.access_token.reveal())["sub"] == "carol"


def test_wrong_client_secret_is_invalid_client(sandbox: SandboxHandle, http: httpx.Client) -> None:
    wrong = canary("wrong-secret")
    servers = registry(sandbox.url, wrong)
    subject = sandbox.provider.issue_subject_token("alice")

    with pytest.raises(UpstreamError) as info:
        make_oauth(http).mint(servers["tx"], Secret(subject))

    assert (info.value.status, info.value.oauth_error, info.value.retryable) == (401, "invalid_client", False)
    assert len(sandbox.provider.requests("token")) == 1  # a permanent error is not retried


# -- the resolver end to end -------------------------------------------------------


def test_resolve_mints_per_user_and_stores_for_that_user_only(sandbox: SandboxHandle, http: httpx.Client,
                                                               client_secret: str, store: CredentialStore,
                                                               clock: FakeClock) -> None:
    servers = registry(sandbox.url, client_secret)
    audit = MemoryAuditSink()
    resolver = Resolver(servers, store, make_oauth(http, clock), audit, clock)
    subject = sandbox.provider.issue_subject_token("alice")
    store.put_subject_token("alice", SubjectToken(Secret(subject)))

    resolved = resolver.resolve("alice", "tx")
    again = resolver.resolve("alice", "tx")

    assert resolved.header == "Authorization" and resolved.value.reveal().startswith("Bearer ")
    assert again.value == resolved.value  # served from the store, not minted twice
    assert sandbox.provider.stats()["grants"]["token_exchange"] == 1
    stored = store.get("alice", servers["tx"].key)
    assert stored is not None and stored.credential.access_token.reveal() == resolved.value.reveal()[7:]
    assert store.get("bob", servers["tx"].key) is None and store.list("bob") == []
    assert [(e.action, e.outcome) for e in audit.events] == [(Action.ACQUIRE, Outcome.SUCCESS),
                                                            (Action.INJECT, Outcome.SUCCESS)]


# -- discovery -------------------------------------------------------------------------


def test_issuer_only_server_discovers_endpoints_and_mints(sandbox: SandboxHandle, http: httpx.Client,
                                                          client_secret: str) -> None:
    servers = registry(sandbox.url, client_secret, tx={
        "mode": "token_exchange", "issuer": sandbox.url, "client_id": "broker-client",
        "client_secret": client_secret, "audience": "tx-api"})
    assert servers["tx"].auth_broker.token_endpoint is None
    oauth = make_oauth(http)
    subject = sandbox.provider.issue_subject_token("alice")

    first = oauth.mint(servers["tx"], Secret(subject))
    second = oauth.mint(servers["tx"], Secret(subject))

    metadata = sandbox.provider.requests("metadata")
    assert [r["path"] for r in metadata] == ["/.well-known/oauth-authorization-server"]  # cached after one
    assert [r["grant_type"] for r in sandbox.provider.requests("token")] == [TOKEN_EXCHANGE, TOKEN_EXCHANGE]
    assert sandbox.provider.decode_token(first.access_token.reveal())["sub"] == "alice"
    assert second.access_token != first.access_token


def test_issuer_only_connect_server_discovers_authorize_token_and_revoke(sandbox: SandboxHandle,
                                                                         http: httpx.Client,
                                                                         client_secret: str) -> None:
    servers = registry(sandbox.url, client_secret, gh={
        "mode": "oauth_connect", "issuer": sandbox.url, "client_id": "broker-client",
        "client_secret": client_secret, "scopes": ["repo"]})
    oauth = make_oauth(http)

    credential = connect_directly(oauth, servers, sandbox.url, "dave")
    assert oauth.revoke(servers["gh"], credential) is True

    assert sandbox.provider.stats()["grants"]["authorization_code"] == 1
    assert sandbox.provider.stats()["revocations"] == 2  # refresh token (its family) and access token
    with pytest.raises(UpstreamError) as info:
        oauth.refresh(servers["gh"], credential)
    assert info.value.oauth_error == "invalid_grant"


def test_metadata_for_another_issuer_is_refused(sandbox: SandboxHandle, http: httpx.Client,
                                                client_secret: str) -> None:
    sandbox.provider.issuer = "https://elsewhere.example.com"  # what the metadata will claim
    servers = registry(sandbox.url, client_secret, tx={
        "mode": "token_exchange", "issuer": sandbox.url, "client_id": "broker-client",
        "client_secret": client_secret})

    with pytest.raises(UpstreamError, match="issuer does not match"):
        make_oauth(http).mint(servers["tx"], Secret(canary("subject")))
    assert sandbox.provider.requests("token") == []


# -- refresh -----------------------------------------------------------------------------


def connected(sandbox: SandboxHandle, http: httpx.Client, client_secret: str, store: CredentialStore,
              clock: FakeClock, user: str = "erin") -> tuple[Resolver, ServerRegistry, Credential]:
    """A resolver over a user whose gh credential was just stored (token lifetime 100 s)."""
    sandbox.provider.configure(access_token_ttl=100)
    servers = registry(sandbox.url, client_secret)
    oauth = make_oauth(http, clock)
    credential = connect_directly(oauth, servers, sandbox.url, user)
    store.put(user, servers["gh"].key, credential)
    return Resolver(servers, store, oauth, MemoryAuditSink(), clock), servers, credential


def test_refresh_with_rotation_stores_the_new_refresh_token(sandbox: SandboxHandle, http: httpx.Client,
                                                            client_secret: str, store: CredentialStore,
                                                            clock: FakeClock) -> None:
    resolver, servers, original = connected(sandbox, http, client_secret, store, clock)
    key = servers["gh"].key

    assert resolver.resolve("erin", "gh").value.reveal() == f"Bearer {original.access_token.reveal()}"
    clock.advance(41)  # refresh point: min(80 % of 100 s, 100 s - 60 s) = 40 s
    resolved = resolver.resolve("erin", "gh")

    stored = store.get("erin", key)
    assert stored is not None and stored.status is CredentialStatus.CONNECTED
    assert stored.credential.refresh_token is not None and original.refresh_token is not None
    assert stored.credential.refresh_token != original.refresh_token
    assert stored.credential.access_token != original.access_token
    assert resolved.value.reveal() == f"Bearer {stored.credential.access_token.reveal()}"
    assert stored.credential.obtained_via is ObtainedVia.CONNECT_FLOW
    assert stored.credential.issued_at == clock.now()
    (refresh,) = [r for r in sandbox.provider.requests("token") if r["grant_type"] == "refresh_token"]
    # No scope on the refresh (RFC 6749 section 6): the grant keeps the scope it had.
    assert refresh["form"] == {"grant_type": "refresh_token", "refresh_token": original.refresh_token.reveal(),
                               "client_id": "broker-client", "client_secret": client_secret}
    assert stored.credential.scopes == original.scopes == ("repo",)
    assert sandbox.provider.stats()["refresh_rotations"] == 1


def test_refresh_without_rotation_keeps_the_refresh_token(sandbox: SandboxHandle, http: httpx.Client,
                                                          client_secret: str, store: CredentialStore,
                                                          clock: FakeClock) -> None:
    resolver, servers, original = connected(sandbox, http, client_secret, store, clock)
    sandbox.provider.configure(rotate_refresh_tokens=False)
    key = servers["gh"].key

    clock.advance(41)
    first = resolver.resolve("erin", "gh")
    clock.advance(41)
    second = resolver.resolve("erin", "gh")

    stored = store.get("erin", key)
    assert stored is not None and stored.status is CredentialStatus.CONNECTED
    assert stored.credential.refresh_token == original.refresh_token
    assert len({original.access_token.reveal(), first.value.reveal()[7:], second.value.reveal()[7:]}) == 3
    stats = sandbox.provider.stats()
    assert (stats["grants"]["refresh_token"], stats["refresh_rotations"], stats["reuse_detected"]) == (2, 0, 0)


def test_replayed_refresh_token_revokes_the_family_and_needs_reconnect(sandbox: SandboxHandle,
                                                                       http: httpx.Client, client_secret: str,
                                                                       store: CredentialStore,
                                                                       clock: FakeClock) -> None:
    resolver, servers, original = connected(sandbox, http, client_secret, store, clock)
    key = servers["gh"].key
    clock.advance(41)
    resolver.resolve("erin", "gh")
    newest = store.get("erin", key)
    assert newest is not None and newest.credential.refresh_token != original.refresh_token

    # An old copy comes back (a restored backup, a lost write): its refresh token was already used.
    store.put("erin", key, original)
    clock.advance(100)  # the old credential is past its expiry, nothing valid to serve
    with pytest.raises(NotConnected) as info:
        resolver.resolve("erin", "gh")

    assert info.value.reason == NotConnected.RECONNECT_REQUIRED
    stored = store.get("erin", key)
    assert stored is not None and stored.status is CredentialStatus.NEEDS_RECONNECT
    assert sandbox.provider.stats()["reuse_detected"] >= 1
    # The provider revoked the whole family: the newest refresh token is dead too.
    with pytest.raises(UpstreamError) as dead:
        resolver.oauth.refresh(servers["gh"], newest.credential)
    assert dead.value.oauth_error == "invalid_grant"
    # And the broker does not try again until the user reconnects.
    calls = len(sandbox.provider.requests("token"))
    with pytest.raises(NotConnected):
        resolver.resolve("erin", "gh")
    assert len(sandbox.provider.requests("token")) == calls
    # Reconnecting (what the connect callback stores) heals it.
    fresh = connect_directly(resolver.oauth, servers, sandbox.url, "erin")  # type: ignore[arg-type]
    store.put("erin", key, fresh)
    assert resolver.resolve("erin", "gh").value.reveal() == f"Bearer {fresh.access_token.reveal()}"
    healed = store.get("erin", key)
    assert healed is not None and healed.status is CredentialStatus.CONNECTED


def test_refresh_keeps_serving_when_credential_is_still_valid_after_invalid_grant(
        sandbox: SandboxHandle, http: httpx.Client, client_secret: str, store: CredentialStore,
        clock: FakeClock) -> None:
    resolver, servers, original = connected(sandbox, http, client_secret, store, clock)
    assert resolver.oauth.revoke(servers["gh"], original.with_changes(access_token=Secret("x" * 12)))

    clock.advance(41)  # due, not expired: stale-if-error
    resolved = resolver.resolve("erin", "gh")

    assert resolved.value.reveal() == f"Bearer {original.access_token.reveal()}"
    stored = store.get("erin", servers["gh"].key)
    assert stored is not None and stored.status is CredentialStatus.NEEDS_RECONNECT
    clock.advance(60)
    with pytest.raises(NotConnected):
        resolver.resolve("erin", "gh")


def test_refresh_of_expired_subject_token_is_not_sent(sandbox: SandboxHandle, http: httpx.Client,
                                                      client_secret: str, store: CredentialStore,
                                                      clock: FakeClock) -> None:
    servers = registry(sandbox.url, client_secret)
    resolver = Resolver(servers, store, make_oauth(http, clock), MemoryAuditSink(), clock)
    store.put_subject_token("alice", SubjectToken(Secret(sandbox.provider.issue_subject_token("alice")),
                                                  expires_at=clock.now() + timedelta(seconds=30)))
    clock.advance(31)

    with pytest.raises(Exception) as info:
        resolver.resolve("alice", "tx")

    assert getattr(info.value, "code", None) == "subject_token_missing"
    assert sandbox.provider.requests("token") == []


# -- client authentication across every grant ------------------------------------------------


def test_client_secret_basic_for_code_refresh_and_revocation(sandbox: SandboxHandle, http: httpx.Client,
                                                            client_secret: str) -> None:
    servers = registry(sandbox.url, client_secret, gh={
        "mode": "oauth_connect", "token_endpoint": f"{sandbox.url}/token",
        "authorization_endpoint": f"{sandbox.url}/authorize", "revocation_endpoint": f"{sandbox.url}/revoke",
        "client_id": "broker-client", "client_secret": client_secret, "client_auth": "client_secret_basic"})
    oauth = make_oauth(http)

    credential = connect_directly(oauth, servers, sandbox.url, "frank")
    renewed = oauth.refresh(servers["gh"], credential)
    assert oauth.revoke(servers["gh"], renewed) is True

    requests = sandbox.provider.requests("token") + sandbox.provider.requests("revoke")
    assert [r["grant_type"] for r in requests] == ["authorization_code", "refresh_token", None, None]
    for request in requests:
        assert request["client_auth"] == "client_secret_basic" and request["client_id"] == "broker-client"
        assert "client_secret" not in request["form"] and "client_id" not in request["form"]
    assert sandbox.provider.stats()["revocations"] == 2


def test_public_client_redeems_refreshes_and_revokes_without_a_secret(sandbox: SandboxHandle,
                                                                      http: httpx.Client,
                                                                      client_secret: str) -> None:
    servers = registry(sandbox.url, client_secret, gh={
        "mode": "oauth_connect", "token_endpoint": f"{sandbox.url}/token",
        "authorization_endpoint": f"{sandbox.url}/authorize", "revocation_endpoint": f"{sandbox.url}/revoke",
        "client_id": "public-client"})
    oauth = make_oauth(http)

    credential = connect_directly(oauth, servers, sandbox.url, "gina")
    renewed = oauth.refresh(servers["gh"], credential)
    assert renewed.refresh_token is not None and renewed.refresh_token != credential.refresh_token
    assert oauth.revoke(servers["gh"], renewed) is True

    requests = sandbox.provider.requests("token") + sandbox.provider.requests("revoke")
    assert len(requests) == 4
    for request in requests:
        assert request["client_auth"] == "none" and request["form"]["client_id"] == "public-client"
        assert "client_secret" not in request["form"]
