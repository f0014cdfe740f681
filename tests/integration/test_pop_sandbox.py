"""private_key_jwt and DPoP against the sandbox over real HTTP.

The sandbox verifies with its own code (``broker.sandbox.pop``): each test
asserts what it accepted, what it refused and what it counted.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from broker.clock import FakeClock
from broker.dpop import DPoPKey, dpop_proof
from broker.errors import UpstreamError
from broker.jose import SigningKey, generate_private_key, private_pem
from broker.oauth import MetadataCache, OAuthClient, TokenEndpointSender, make_http_client
from broker.oauth.assertion import CLIENT_ASSERTION_TYPE, client_assertion
from broker.resolver import resolved_from
from broker.sandbox import SandboxHandle, run_sandbox
from broker.secret import Secret
from broker.servers import ServerConfig, parse_servers
from broker.settings import Settings
from tests.integration.oauth_harness import RegisteringProvider
from tests.integration.test_provider_profiles import connect
from tests.secrets import register

pytestmark = pytest.mark.integration


class PopProvider(RegisteringProvider):
    """Registers re-signed (DPoP-bound) tokens with the secret guard too."""

    def bind_to_dpop_key(self, body: dict[str, Any], jkt: str) -> dict[str, Any]:
        bound = super().bind_to_dpop_key(body, jkt)
        register(bound["access_token"])
        return bound


@pytest.fixture(params=["ES256", "RS256"])
def client_key(request: pytest.FixtureRequest) -> SigningKey:
    key = SigningKey.of(generate_private_key(request.param))
    register(private_pem(key.key))
    return key


@pytest.fixture
def sandbox(client_key: SigningKey) -> Iterator[SandboxHandle]:
    provider = PopProvider(clients={"public-client": None}, client_jwks={"pkj-client": client_key.public_jwk()})
    with run_sandbox(provider) as handle:
        yield handle
    with provider.lock:
        for token in [*provider.store.refresh, *provider.store.codes]:
            register(token)


@pytest.fixture
def oauth(clock: FakeClock) -> Iterator[OAuthClient]:
    # The sandbox judges iat and exp by its own wall clock: so does this client.
    http = make_http_client(Settings(http_read_timeout=5.0))
    yield OAuthClient(TokenEndpointSender(http, retry_seconds=2, max_attempts=2), MetadataCache())
    http.close()


def server(sandbox: SandboxHandle, client_key: SigningKey | None, mode: str = "token_exchange",
           **auth: Any) -> ServerConfig:
    block: dict[str, Any] = {
        "mode": mode, "token_endpoint": f"{sandbox.url}/token", "authorization_endpoint": f"{sandbox.url}/authorize",
        "revocation_endpoint": f"{sandbox.url}/revoke", "client_id": "pkj-client", **auth,
    }
    environ = {}
    if client_key is not None:
        block.update(client_auth="private_key_jwt", client_assertion_key_env="PKJ_KEY",
                     client_assertion_kid=client_key.kid)
        environ["PKJ_KEY"] = private_pem(client_key.key)
    return parse_servers({"servers": [{"name": "svc", "url": "https://svc.example/mcp", "auth_broker": block}]},
                         environ)["svc"]


def assertion_claims(form: dict[str, Any]) -> dict[str, Any]:
    payload = form["client_assertion"].split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


# -- private_key_jwt ----------------------------------------------------------------


def test_private_key_jwt_on_every_grant(sandbox: SandboxHandle, oauth: OAuthClient, client_key: SigningKey) -> None:
    provider = sandbox.provider
    subject = Secret(provider.issue_subject_token("alice"))
    minted = oauth.mint(server(sandbox, client_key), subject)
    oauth.mint(server(sandbox, client_key, "entra_obo", scopes=["api://svc/.default"]), subject)
    connect_svc = server(sandbox, client_key, "oauth_connect", scopes=["repo"])
    _, connected = connect(oauth, connect_svc, "alice")
    renewed = oauth.refresh(connect_svc, connected)
    assert oauth.revoke(connect_svc, renewed) is True
    assert minted.token_type == "Bearer"
    token_calls = provider.requests("token")
    revocations = provider.requests("revoke")
    assert [r["grant_type"] for r in token_calls] == [
        "urn:ietf:params:oauth:grant-type:token-exchange", "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "authorization_code", "refresh_token"]
    calls = token_calls + revocations
    assert len(revocations) == 2 and all(r["client_auth"] == "private_key_jwt" for r in calls)
    claims = [assertion_claims(r["form"]) for r in calls]
    assert len({c["jti"] for c in claims}) == 6  # one assertion per request, never reused
    assert {c["aud"] for c in claims} == {f"{sandbox.url}/token"}
    assert {c["iss"] for c in claims} == {c["sub"] for c in claims} == {"pkj-client"}
    assert provider.stats()["errors"] == {} and provider.stats()["revocations"] == 2


def test_assertions_the_sandbox_refuses(sandbox: SandboxHandle, oauth: OAuthClient, client_key: SigningKey) -> None:
    provider = sandbox.provider
    subject = provider.issue_subject_token("bob")
    token_url = f"{sandbox.url}/token"

    def post(assertion: str) -> httpx.Response:
        return httpx.post(token_url, data={
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange", "subject_token": subject,
            "subject_token_type": "urn:ietf:params:oauth:token-type:access_token", "client_id": "pkj-client",
            "client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": assertion})

    import time as _time

    now = _time.time()
    good = client_assertion(client_key, "pkj-client", token_url, now)
    head, body, sig = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    forged = base64.urlsafe_b64encode(json.dumps({**claims, "exp": claims["exp"] + 3600}).encode()).rstrip(b"=")
    cases = {
        "tampered": f"{head}.{forged.decode()}.{sig}",
        "wrong_aud": client_assertion(client_key, "pkj-client", "https://elsewhere.example/token", now),
        "expired": client_assertion(client_key, "pkj-client", token_url, now - 120),
        "wrong_key": client_assertion(SigningKey.of(generate_private_key(client_key.alg)), "pkj-client", token_url, now),
    }
    for case, assertion in cases.items():
        r = post(assertion)
        assert (r.status_code, r.json()["error"]) == (401, "invalid_client"), case
    first = post(good)
    replay = post(good)
    assert first.status_code == 200 and register(first.json()["access_token"])
    assert (replay.status_code, replay.json()["error"]) == (401, "invalid_client")
    assert provider.stats()["errors"] == {"invalid_client": 5}
    # The broker with a key the server does not know: a coarse, secret-free error.
    stranger = SigningKey.of(generate_private_key("ES256"))
    with pytest.raises(UpstreamError) as info:
        oauth.mint(server(sandbox, stranger), Secret(subject))
    assert (info.value.status, info.value.oauth_error) == (401, "invalid_client")


# -- DPoP -------------------------------------------------------------------------------


def test_dpop_nonce_binding_and_the_resource(sandbox: SandboxHandle, oauth: OAuthClient,
                                             client_key: SigningKey) -> None:
    provider = sandbox.provider
    provider.configure(dpop_nonce="nonce-1")
    svc = server(sandbox, client_key, dpop=True)
    cred = oauth.mint(svc, Secret(provider.issue_subject_token("carol")))
    # First proof had no nonce: use_dpop_nonce, then one retry with it.
    calls = provider.requests("token")
    assert len(calls) == 2 and provider.stats()["errors"] == {"use_dpop_nonce": 1}
    assert cred.token_type == "DPoP" and cred.dpop_key is not None
    assert provider.decode_token(cred.access_token.reveal())["cnf"] == {"jkt": cred.dpop_key.thumbprint}
    again = oauth.mint(svc, Secret(provider.issue_subject_token("carol")))  # the nonce is remembered
    assert len(provider.requests("token")) == 3 and again.dpop_key != cred.dpop_key

    resource = f"{sandbox.url}/test/resource"
    resolved = resolved_from(svc, cred, method="GET", url=resource + "?page=1")
    headers = resolved.apply({})
    ok = httpx.get(resource + "?page=1", headers=headers)
    assert ok.status_code == 200 and ok.json()["jkt"] == cred.dpop_key.thumbprint
    replayed = httpx.get(resource, headers=headers)
    assert replayed.status_code == 401 and replayed.json()["error"] == "invalid_dpop_proof"
    post_proof = {**headers, "DPoP": resolved.dpop_proof("POST", resource).reveal()}
    wrong_htm = httpx.get(resource, headers=post_proof)
    wrong_htu = httpx.get(resource, headers={**headers, "DPoP": resolved.dpop_proof("GET", f"{sandbox.url}/x").reveal()})
    other = resolved_from(svc, again, method="GET", url=resource)
    wrong_ath = httpx.get(resource, headers={**headers, "DPoP": other.dpop.reveal()})  # type: ignore[union-attr]
    as_bearer = httpx.get(resource, headers={"Authorization": "Bearer " + cred.access_token.reveal(),
                                             "DPoP": resolved.dpop_proof("GET", resource).reveal()})
    for r in (wrong_htm, wrong_htu, wrong_ath, as_bearer):
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("DPoP error=")
    assert provider.stats()["resource_calls"] == {"ok": 1, "rejected": 5}
    fresh = httpx.post(resource, headers={**headers, "DPoP": resolved.dpop_proof("POST", resource).reveal()})
    assert fresh.status_code == 200

    # Tampered and stale proofs, over HTTP.
    good = resolved.dpop_proof("GET", resource).reveal()
    head, body, sig = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    forged = base64.urlsafe_b64encode(json.dumps({**claims, "htm": "DELETE"}).encode()).rstrip(b"=").decode()
    tampered = httpx.delete(resource, headers={**headers, "DPoP": f"{head}.{forged}.{sig}"})
    stale = httpx.get(resource, headers={**headers, "DPoP": resolved.dpop_proof(
        "GET", resource, now=__import__("time").time() - 120).reveal()})
    for r in (tampered, stale):
        assert r.status_code == 401 and r.json()["error"] == "invalid_dpop_proof"

    # A resource that demands a nonce: refused with the nonce, then accepted with it.
    provider.configure(resource_dpop_nonce="rs-nonce-1")
    demand = httpx.get(resource, headers={**headers, "DPoP": resolved.dpop_proof("GET", resource).reveal()})
    assert demand.status_code == 401 and demand.headers["dpop-nonce"] == "rs-nonce-1"
    assert demand.json()["error"] == "use_dpop_nonce"
    with_nonce = resolved_from(svc, cred, method="GET", url=resource, dpop_nonce=demand.headers["dpop-nonce"])
    assert httpx.get(resource, headers=with_nonce.apply({})).status_code == 200
    provider.configure(resource_dpop_nonce=None)

    # A proof without the server's nonce at the token endpoint is refused with the nonce to use.
    provider.configure(dpop_nonce="nonce-2")
    raw = httpx.post(f"{sandbox.url}/token", headers={"DPoP": dpop_proof(
        DPoPKey.generate(), "POST", f"{sandbox.url}/token", __import__("time").time(), nonce="nonce-1")}, data={})
    assert raw.status_code == 400 and raw.json()["error"] == "use_dpop_nonce"
    assert raw.headers["dpop-nonce"] == "nonce-2"


def test_dpop_connect_refresh_keeps_the_key(sandbox: SandboxHandle, oauth: OAuthClient) -> None:
    provider = sandbox.provider
    svc = server(sandbox, None, "oauth_connect", client_id="public-client", dpop=True, scopes=["repo"])
    _, first = connect(oauth, svc, "dave")
    assert first.dpop_key is not None and first.refresh_token is not None
    second = oauth.refresh(svc, first)
    assert second.dpop_key == first.dpop_key and second.token_type == "DPoP"
    assert provider.decode_token(second.access_token.reveal())["cnf"]["jkt"] == first.dpop_key.thumbprint
    # The rotated refresh token is bound to the key: presented with another key, it is refused.
    with pytest.raises(UpstreamError) as info:
        oauth.refresh(svc, second.with_changes(dpop_key=DPoPKey.generate()))
    assert (info.value.status, info.value.oauth_error) == (400, "invalid_dpop_proof")
    # A server that ignores DPoP (issues Bearer) is refused rather than served as DPoP.
    plain = server(sandbox, None, "oauth_connect", client_id="public-client", scopes=["repo"])
    _, bearer = connect(oauth, plain, "dave")
    assert bearer.token_type == "Bearer" and bearer.dpop_key is None
    assert provider.stats()["dpop_bound_tokens"] == 2
