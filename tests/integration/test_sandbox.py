"""The sandbox identity provider, driven over real HTTP on loopback."""

from __future__ import annotations

import base64
import os
import secrets
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote_plus, urlsplit

import httpx
import pytest

import broker.sandbox as sandbox_pkg
from broker.sandbox import (
    ACCESS_TOKEN_TYPE,
    JWT_BEARER,
    TOKEN_EXCHANGE,
    SandboxHandle,
    SandboxProvider,
    run_sandbox,
    s256,
)
from broker.sandbox.jwt import unverified_claims

pytestmark = pytest.mark.integration

CLIENT_ID = "broker-client"
CLIENT_SECRET = "sandbox-client-secret-s3cr3t"
CONFIDENTIAL = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
REDIRECT_URI = "http://127.0.0.1:9/callback"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxHandle]:
    with run_sandbox() as handle:
        yield handle


@pytest.fixture(autouse=True)
def _fresh(sandbox: SandboxHandle) -> None:
    sandbox.provider.reset()


@pytest.fixture
def http(sandbox: SandboxHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.url, timeout=5.0, trust_env=False) as client:
        yield client


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def exchange(http: httpx.Client, subject_token: str, **extra: str | list[str]) -> httpx.Response:
    data = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        **CONFIDENTIAL,
        **extra,
    }
    return http.post("/token", data=data)


def new_pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    return verifier, s256(verifier)


def get_code(http: httpx.Client, challenge: str, *, client_id: str = CLIENT_ID, user: str = "alice",
             scope: str = "read write", state: str = "st-1") -> str:
    response = http.get("/authorize", params={
        "response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT_URI, "state": state,
        "code_challenge": challenge, "code_challenge_method": "S256", "scope": scope,
        "consent": "approve", "user": user,
    })
    assert response.status_code == 302
    query = parse_qs(urlsplit(response.headers["location"]).query)
    assert query["state"] == [state]
    return query["code"][0]


def redeem(http: httpx.Client, code: str, verifier: str, **client: str) -> httpx.Response:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier, **(client or CONFIDENTIAL)}
    return http.post("/token", data=data)


def connect(http: httpx.Client, user: str = "alice") -> dict[str, Any]:
    verifier, challenge = new_pkce()
    response = redeem(http, get_code(http, challenge, user=user), verifier)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def refresh(http: httpx.Client, refresh_token: str) -> httpx.Response:
    return http.post("/token", data={"grant_type": "refresh_token", "refresh_token": refresh_token, **CONFIDENTIAL})


def active(http: httpx.Client, token: str) -> bool:
    response = http.post("/introspect", data={"token": token, **CONFIDENTIAL})
    assert response.status_code == 200
    return bool(response.json()["active"])


# -- package and metadata ---------------------------------------------------


def test_public_api_is_exported() -> None:
    for name in ("SandboxProvider", "SandboxHandle", "create_app", "run_sandbox"):
        assert name in sandbox_pkg.__all__
        assert hasattr(sandbox_pkg, name)


@pytest.mark.parametrize("path", ["/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"])
def test_metadata(http: httpx.Client, sandbox: SandboxHandle, path: str) -> None:
    body = http.get(path).json()
    assert body["issuer"] == sandbox.url
    assert body["token_endpoint"] == f"{sandbox.url}/token"
    assert body["authorization_endpoint"] == f"{sandbox.url}/authorize"
    assert body["revocation_endpoint"] == f"{sandbox.url}/revoke"
    assert body["code_challenge_methods_supported"] == ["S256"]
    assert TOKEN_EXCHANGE in body["grant_types_supported"]
    assert {"client_secret_post", "client_secret_basic", "none"} <= set(body["token_endpoint_auth_methods_supported"])


# -- token exchange and OBO -------------------------------------------------


def test_token_exchange_happy_path(http: httpx.Client, sandbox: SandboxHandle) -> None:
    minted = http.post("/test/subject-token", json={"user_id": "tenant:alice", "ttl": 600}).json()
    assert minted["expires_in"] == 600
    assert unverified_claims(minted["access_token"])["sub"] == "tenant:alice"

    first = exchange(http, minted["access_token"], audience="upstream-api", scope="read")
    second = exchange(http, minted["access_token"], resource="https://api.example.com/mcp")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["token_type"] == "Bearer"
    assert body["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert body["expires_in"] == 3600 and body["scope"] == "read"
    claims = unverified_claims(body["access_token"])
    assert claims["sub"] == "tenant:alice" and claims["aud"] == "upstream-api" and claims["scope"] == "read"
    assert claims["iss"] == sandbox.url and claims["exp"] - claims["iat"] == 3600
    second_claims = unverified_claims(second.json()["access_token"])
    assert second_claims["aud"] == "https://api.example.com/mcp"
    assert second_claims["jti"] != claims["jti"]

    stats = sandbox.provider.stats()
    assert stats["grants"]["token_exchange"] == 2
    assert stats["by_user"] == {"tenant:alice": {"token_exchange": 2}}
    recorded = sandbox.provider.requests("token")
    assert [r["client_auth"] for r in recorded] == ["client_secret_post", "client_secret_post"]
    assert recorded[0]["form"]["audience"] == "upstream-api"


def test_client_secret_basic_is_form_urlencoded(http: httpx.Client, sandbox: SandboxHandle) -> None:
    odd_secret = "s3cr:t/+ &é"
    sandbox.provider.configure(clients={"odd:client": odd_secret})
    basic = base64.b64encode(f"{quote_plus('odd:client')}:{quote_plus(odd_secret)}".encode()).decode()
    data = {"grant_type": TOKEN_EXCHANGE, "subject_token": sandbox.provider.issue_subject_token("bob"),
            "subject_token_type": ACCESS_TOKEN_TYPE}
    response = http.post("/token", data=data, headers={"Authorization": f"Basic {basic}"})
    assert response.status_code == 200, response.text
    assert unverified_claims(response.json()["access_token"])["client_id"] == "odd:client"
    assert sandbox.provider.requests("token")[-1]["client_auth"] == "client_secret_basic"

    wrong = base64.b64encode(b"odd%3Aclient:nope").decode()
    rejected = http.post("/token", data=data, headers={"Authorization": f"Basic {wrong}"})
    assert rejected.status_code == 401 and rejected.json()["error"] == "invalid_client"
    assert rejected.headers["www-authenticate"].startswith("Basic")


@pytest.mark.parametrize("client", [
    {"client_id": CLIENT_ID, "client_secret": "wrong"},
    {"client_id": "nobody", "client_secret": "x"},
    {"client_id": CLIENT_ID},
    {"client_id": "public-client"},
    {},
])
def test_bad_client_is_invalid_client(http: httpx.Client, sandbox: SandboxHandle, client: dict[str, str]) -> None:
    data = {"grant_type": TOKEN_EXCHANGE, "subject_token": sandbox.provider.issue_subject_token("alice"),
            "subject_token_type": ACCESS_TOKEN_TYPE, **client}
    response = http.post("/token", data=data)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert sandbox.provider.stats()["errors"] == {"invalid_client": 1}


def test_several_resources_become_an_audience_list(http: httpx.Client, sandbox: SandboxHandle) -> None:
    subject = sandbox.provider.issue_subject_token("alice")
    body = exchange(http, subject, resource=["https://a.example/", "https://b.example/"]).json()
    assert unverified_claims(body["access_token"])["aud"] == ["https://a.example/", "https://b.example/"]
    assert sandbox.provider.requests("token")[-1]["form"]["resource"] == ["https://a.example/", "https://b.example/"]
    relative = exchange(http, subject, resource="/not-absolute")
    assert relative.status_code == 400 and relative.json()["error"] == "invalid_target"


def test_invalid_subject_tokens_are_invalid_grant(http: httpx.Client, sandbox: SandboxHandle) -> None:
    provider = sandbox.provider
    access_token = exchange(http, provider.issue_subject_token("alice")).json()["access_token"]
    foreign = SandboxProvider().issue_subject_token("alice")
    for bad in ("not-a-jwt", "é.é.é", provider.issue_subject_token("alice", ttl=-5), access_token, foreign):
        response = exchange(http, bad)
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_grant"
    bad_type = exchange(http, provider.issue_subject_token("alice"),
                        subject_token_type="urn:ietf:params:oauth:token-type:saml2")
    assert bad_type.status_code == 400 and bad_type.json()["error"] == "invalid_request"
    assert provider.stats()["grants"]["token_exchange"] == 1


def test_on_behalf_of(http: httpx.Client, sandbox: SandboxHandle) -> None:
    assertion = sandbox.provider.issue_subject_token("carol")
    data = {"grant_type": JWT_BEARER, "assertion": assertion, "requested_token_use": "on_behalf_of",
            "scope": "api://upstream/.default", **CONFIDENTIAL}
    response = http.post("/token", data=data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer" and body["scope"] == "api://upstream/.default"
    claims = unverified_claims(body["access_token"])
    assert claims["sub"] == "carol" and claims["aud"] == "api://upstream"
    assert sandbox.provider.stats()["grants"]["obo"] == 1

    for missing in ("requested_token_use", "scope"):
        partial = {k: v for k, v in data.items() if k != missing}
        rejected = http.post("/token", data=partial)
        assert rejected.status_code == 400 and rejected.json()["error"] == "invalid_request"


def test_password_grant_returns_a_subject_token(http: httpx.Client, sandbox: SandboxHandle) -> None:
    response = http.post("/token", data={"grant_type": "password", "username": "dave", "password": "pw"})
    assert response.status_code == 200
    subject_token = response.json()["access_token"]
    assert exchange(http, subject_token).status_code == 200
    assert sandbox.provider.stats()["by_user"]["dave"] == {"password": 1, "token_exchange": 1}
    empty = http.post("/token", data={"grant_type": "password", "username": "dave", "password": ""})
    assert empty.json()["error"] == "invalid_request"


def test_unknown_grant(http: httpx.Client) -> None:
    response = http.post("/token", data={"grant_type": "client_credentials", **CONFIDENTIAL})
    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_grant_type"
    assert response.headers["cache-control"] == "no-store"


# -- authorization code + PKCE ----------------------------------------------


def test_authorization_code_happy_path(http: httpx.Client, sandbox: SandboxHandle) -> None:
    body = connect(http, user="erin")
    assert body["refresh_token"].startswith("sbx_rt_")
    assert body["scope"] == "read write" and body["token_type"] == "Bearer"
    assert unverified_claims(body["access_token"])["sub"] == "erin"
    assert sandbox.provider.stats()["by_user"]["erin"] == {"authorization_code": 1}


def test_public_client_with_pkce(http: httpx.Client) -> None:
    verifier, challenge = new_pkce()
    code = get_code(http, challenge, client_id="public-client")
    response = redeem(http, code, verifier, client_id="public-client")
    assert response.status_code == 200, response.text
    again = http.post("/token", data={"grant_type": "refresh_token", "client_id": "public-client",
                                      "refresh_token": response.json()["refresh_token"]})
    assert again.status_code == 200


def test_pkce_verifier_mismatch(http: httpx.Client) -> None:
    _, challenge = new_pkce()
    response = redeem(http, get_code(http, challenge), secrets.token_urlsafe(48))
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"


def test_redirect_uri_must_match(http: httpx.Client) -> None:
    verifier, challenge = new_pkce()
    code = get_code(http, challenge)
    response = http.post("/token", data={"grant_type": "authorization_code", "code": code, "code_verifier": verifier,
                                         "redirect_uri": "http://127.0.0.1:9/other", **CONFIDENTIAL})
    assert response.json()["error"] == "invalid_grant"


def test_code_reuse_is_refused_and_revokes_what_it_issued(http: httpx.Client) -> None:
    verifier, challenge = new_pkce()
    code = get_code(http, challenge)
    first = redeem(http, code, verifier)
    assert first.status_code == 200
    second = redeem(http, code, verifier)
    assert second.status_code == 400 and second.json()["error"] == "invalid_grant"
    assert refresh(http, first.json()["refresh_token"]).json()["error"] == "invalid_grant"
    assert not active(http, first.json()["access_token"])


def test_codes_expire_after_sixty_seconds() -> None:
    now = [1_800_000_000.0]
    with run_sandbox(SandboxProvider(clock=lambda: now[0])) as handle:
        with httpx.Client(base_url=handle.url, timeout=5.0, trust_env=False) as client:
            verifier, challenge = new_pkce()
            fresh_code = get_code(client, challenge)
            stale_code = get_code(client, challenge)
            assert redeem(client, fresh_code, verifier).status_code == 200
            now[0] += 61
            expired = redeem(client, stale_code, verifier)
            assert expired.status_code == 400 and expired.json()["error"] == "invalid_grant"


@pytest.mark.parametrize("override", [
    {"code_challenge_method": "plain"},
    {"code_challenge_method": None},
    {"code_challenge": None},
])
def test_authorize_requires_s256(http: httpx.Client, override: dict[str, str | None]) -> None:
    params: dict[str, str | None] = {
        "response_type": "code", "client_id": CLIENT_ID, "redirect_uri": REDIRECT_URI, "state": "s",
        "code_challenge": new_pkce()[1], "code_challenge_method": "S256", "consent": "approve", **override,
    }
    response = http.get("/authorize", params={k: v for k, v in params.items() if v is not None})
    assert response.status_code == 302
    query = parse_qs(urlsplit(response.headers["location"]).query)
    assert query["error"] == ["invalid_request"] and query["state"] == ["s"]


def test_authorize_deny_and_consent_page(http: httpx.Client) -> None:
    params = {"response_type": "code", "client_id": CLIENT_ID, "redirect_uri": REDIRECT_URI, "state": "s<1>",
              "code_challenge": new_pkce()[1], "code_challenge_method": "S256", "scope": "read"}
    denied = http.get("/authorize", params={**params, "consent": "deny"})
    assert parse_qs(urlsplit(denied.headers["location"]).query)["error"] == ["access_denied"]

    page = http.get("/authorize", params=params)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'action="/authorize"' in page.text and "s&lt;1&gt;" in page.text
    approved = http.post("/authorize", data={**params, "consent": "approve", "user": "frank"})
    query = parse_qs(urlsplit(approved.headers["location"]).query)
    assert approved.status_code == 302 and query["state"] == ["s<1>"] and query["code"][0].startswith("sbx_ac_")


def test_authorize_unknown_client_does_not_redirect(http: httpx.Client) -> None:
    response = http.get("/authorize", params={"response_type": "code", "client_id": "nobody",
                                              "redirect_uri": REDIRECT_URI, "code_challenge": "x",
                                              "code_challenge_method": "S256"})
    assert response.status_code == 400 and "location" not in response.headers


# -- refresh tokens ------------------------------------------------------------


def test_refresh_rotation_and_reuse_detection(http: httpx.Client, sandbox: SandboxHandle) -> None:
    initial = connect(http)
    rotated = refresh(http, initial["refresh_token"])
    assert rotated.status_code == 200
    newest = rotated.json()["refresh_token"]
    assert newest != initial["refresh_token"]
    assert active(http, newest) and not active(http, initial["refresh_token"])
    assert refresh(http, newest).status_code == 200  # the chain keeps working

    reused = refresh(http, initial["refresh_token"])
    assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"
    # The whole family is gone: descendants and the access tokens it issued.
    assert all(not active(http, t) for t in (newest, initial["access_token"], rotated.json()["access_token"]))
    stats = sandbox.provider.stats()
    assert stats["reuse_detected"] == 1 and stats["refresh_rotations"] == 2
    assert stats["grants"]["refresh_token"] == 2


def test_concurrent_refreshes_with_rotation_trip_reuse_detection(http: httpx.Client, sandbox: SandboxHandle) -> None:
    token = connect(http)["refresh_token"]
    results: list[int] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        with httpx.Client(base_url=sandbox.url, timeout=5.0, trust_env=False) as client:
            barrier.wait()
            results.append(refresh(client, token).status_code)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == [200, 400, 400, 400]
    assert sandbox.provider.stats()["reuse_detected"] == 1  # later ones find the family already revoked


def test_no_rotation_mode(http: httpx.Client, sandbox: SandboxHandle) -> None:
    sandbox.provider.configure(rotate_refresh_tokens=False)
    token = connect(http)["refresh_token"]
    for _ in range(3):
        response = refresh(http, token)
        assert response.status_code == 200
        assert "refresh_token" not in response.json()
    stats = sandbox.provider.stats()
    assert stats["reuse_detected"] == 0 and stats["refresh_rotations"] == 0 and stats["grants"]["refresh_token"] == 3


def test_refresh_scope_narrowing(http: httpx.Client) -> None:
    token = connect(http)["refresh_token"]
    narrowed = http.post("/token", data={"grant_type": "refresh_token", "refresh_token": token, "scope": "read",
                                         **CONFIDENTIAL})
    assert narrowed.json()["scope"] == "read"
    wider = http.post("/token", data={"grant_type": "refresh_token", "scope": "admin",
                                      "refresh_token": narrowed.json()["refresh_token"], **CONFIDENTIAL})
    assert wider.json()["error"] == "invalid_scope"


# -- revocation and expiry ---------------------------------------------------


def test_revoke_refresh_token_revokes_family(http: httpx.Client, sandbox: SandboxHandle) -> None:
    body = connect(http)
    response = http.post("/revoke", data={"token": body["refresh_token"], "token_type_hint": "refresh_token",
                                          **CONFIDENTIAL})
    assert response.status_code == 200
    assert refresh(http, body["refresh_token"]).json()["error"] == "invalid_grant"
    assert not active(http, body["access_token"])
    assert http.post("/revoke", data={"token": "unknown", **CONFIDENTIAL}).status_code == 200
    assert http.post("/revoke", data={"token": "x", "client_id": CLIENT_ID, "client_secret": "no"}).status_code == 401
    assert sandbox.provider.stats()["revocations"] == 1


def test_revoke_access_token(http: httpx.Client, sandbox: SandboxHandle) -> None:
    token = exchange(http, sandbox.provider.issue_subject_token("alice")).json()["access_token"]
    assert active(http, token)
    assert http.post("/revoke", data={"token": token, **CONFIDENTIAL}).status_code == 200
    assert not active(http, token)


def test_clock_skew_and_ttl(http: httpx.Client, sandbox: SandboxHandle) -> None:
    sandbox.provider.configure(clock_skew=-7200, access_token_ttl=60)
    body = exchange(http, sandbox.provider.issue_subject_token("alice")).json()
    claims = unverified_claims(body["access_token"])
    assert body["expires_in"] == 60
    assert claims["exp"] < time.time() - 7000
    assert not active(http, body["access_token"])


# -- faults and latency ----------------------------------------------------------


def test_fault_5xx_then_recovers(http: httpx.Client, sandbox: SandboxHandle) -> None:
    sandbox.provider.set_fault("token", "5xx", count=2)
    subject = sandbox.provider.issue_subject_token("alice")
    assert [exchange(http, subject).status_code for _ in range(3)] == [503, 503, 200]
    assert sandbox.provider.stats()["faults_served"] == 2
    assert [r["fault"] for r in sandbox.provider.requests("token")] == ["5xx", "5xx", None]


def test_fault_429_has_retry_after(http: httpx.Client, sandbox: SandboxHandle) -> None:
    sandbox.provider.set_fault("token", "429", count=1, retry_after=7)
    response = exchange(http, sandbox.provider.issue_subject_token("alice"))
    assert response.status_code == 429 and response.headers["retry-after"] == "7"


def test_fault_503_carries_retry_after_and_invalid_grant_is_a_400(http: httpx.Client,
                                                                  sandbox: SandboxHandle) -> None:
    sandbox.provider.set_fault("token", "503", count=1, retry_after=2)
    response = exchange(http, sandbox.provider.issue_subject_token("alice"))
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    assert response.json()["error"] == "temporarily_unavailable"
    sandbox.provider.set_fault("token", "invalid_grant", count=1)
    response = exchange(http, sandbox.provider.issue_subject_token("alice"))
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"


def test_refresh_tokens_die_of_disuse(http: httpx.Client, sandbox: SandboxHandle) -> None:
    now = [time.time()]
    provider = sandbox.provider
    real_clock = provider.clock
    provider.clock = lambda: now[0]
    try:
        provider.configure(refresh_idle_seconds=100, rotate_refresh_tokens=False)
        token = connect(http)["refresh_token"]
        for _ in range(3):  # each use restarts the idle clock
            now[0] += 99
            assert refresh(http, token).status_code == 200
        now[0] += 101
        response = refresh(http, token)
        assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
        provider.configure(rotate_refresh_tokens=True)
        rotated = refresh(http, connect(http)["refresh_token"]).json()["refresh_token"]
        now[0] += 99
        assert refresh(http, rotated).status_code == 200
        now[0] += 101
        assert refresh(http, connect(http)["refresh_token"]).status_code == 200  # a fresh one is fine
    finally:
        provider.clock = real_clock


def test_fault_until_cleared(http: httpx.Client, sandbox: SandboxHandle) -> None:
    sandbox.provider.set_fault("revoke", "5xx")
    assert all(http.post("/revoke", data={"token": "t", **CONFIDENTIAL}).status_code == 503 for _ in range(3))
    sandbox.provider.set_fault("revoke", None)
    assert http.post("/revoke", data={"token": "t", **CONFIDENTIAL}).status_code == 200


@pytest.mark.parametrize("endpoint,path", [("metadata", "/.well-known/openid-configuration"),
                                           ("authorize", "/authorize")])
def test_faults_on_get_endpoints(http: httpx.Client, sandbox: SandboxHandle, endpoint: str, path: str) -> None:
    sandbox.provider.set_fault(endpoint, "5xx", count=1)
    assert http.get(path).status_code == 503


def test_fault_malformed(http: httpx.Client, sandbox: SandboxHandle) -> None:
    sandbox.provider.set_fault("token", "malformed", count=1)
    response = exchange(http, sandbox.provider.issue_subject_token("alice"))
    assert response.status_code == 200 and response.text == '{"access_token": "x",'


def test_fault_no_access_token(http: httpx.Client, sandbox: SandboxHandle) -> None:
    sandbox.provider.set_fault("token", "no_access_token", count=1)
    response = exchange(http, sandbox.provider.issue_subject_token("alice"))
    assert response.status_code == 200 and response.json() == {"token_type": "Bearer", "expires_in": 3600}


def test_fault_huge(http: httpx.Client, sandbox: SandboxHandle) -> None:
    sandbox.provider.set_fault("token", "huge", count=1)
    response = exchange(http, sandbox.provider.issue_subject_token("alice"))
    assert response.status_code == 200 and len(response.content) >= 2 * 1024 * 1024


def test_fault_echo_secret(http: httpx.Client, sandbox: SandboxHandle) -> None:
    sandbox.provider.set_fault("token", "echo_secret", count=2)
    subject = sandbox.provider.issue_subject_token("alice")
    response = exchange(http, subject)
    assert response.status_code == 400
    description = response.json()["error_description"]
    assert CLIENT_SECRET in description and subject in description
    basic = http.post("/token", auth=(CLIENT_ID, CLIENT_SECRET),
                      data={"grant_type": "refresh_token", "refresh_token": "sbx_rt_leakme"})
    assert CLIENT_SECRET in basic.json()["error_description"] and "sbx_rt_leakme" in basic.text


def test_fault_hang_does_not_block_other_requests(sandbox: SandboxHandle) -> None:
    provider = sandbox.provider
    provider.set_fault("metadata", "hang", count=1, hang_seconds=1.0)
    outcome: dict[str, Any] = {}

    def hung_request() -> None:
        started = time.monotonic()
        with httpx.Client(base_url=sandbox.url, timeout=5.0, trust_env=False) as client:
            outcome["status"] = client.get("/.well-known/openid-configuration").status_code
        outcome["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=hung_request)
    thread.start()
    wait_until(lambda: len(provider.requests("metadata")) == 1)
    started = time.monotonic()
    with httpx.Client(base_url=sandbox.url, timeout=5.0, trust_env=False) as client:
        assert client.get("/.well-known/openid-configuration").status_code == 200
    assert time.monotonic() - started < 0.5
    thread.join(5)
    assert outcome["status"] == 200 and outcome["elapsed"] >= 0.9


def test_fault_hang_times_out_a_short_client(http: httpx.Client, sandbox: SandboxHandle) -> None:
    sandbox.provider.set_fault("metadata", "hang", count=1, hang_seconds=0.6)
    with pytest.raises(httpx.ReadTimeout):
        http.get("/.well-known/oauth-authorization-server", timeout=0.1)


def test_latency(http: httpx.Client, sandbox: SandboxHandle) -> None:
    sandbox.provider.set_latency("token", 200)
    subject = sandbox.provider.issue_subject_token("alice")
    started = time.monotonic()
    assert exchange(http, subject).status_code == 200
    assert time.monotonic() - started >= 0.2
    sandbox.provider.set_latency("token", 0)
    started = time.monotonic()
    assert exchange(http, subject).status_code == 200
    assert time.monotonic() - started < 0.2


def test_stop_ends_a_hanging_request_quickly() -> None:
    handle = run_sandbox()
    handle.provider.set_fault("metadata", "hang", hang_seconds=30)
    outcome: list[int] = []

    def hung_request() -> None:
        with httpx.Client(base_url=handle.url, timeout=10.0, trust_env=False) as client:
            try:
                outcome.append(client.get("/.well-known/openid-configuration").status_code)
            except httpx.HTTPError:
                outcome.append(-1)

    thread = threading.Thread(target=hung_request)
    thread.start()
    wait_until(lambda: len(handle.provider.requests("metadata")) == 1)
    started = time.monotonic()
    handle.stop()
    handle.stop()  # idempotent
    thread.join(5)
    assert time.monotonic() - started < 3
    assert outcome and not thread.is_alive()


# -- admin over HTTP ---------------------------------------------------------------


def test_admin_endpoints(http: httpx.Client, sandbox: SandboxHandle) -> None:
    assert http.post("/_admin/faults", json={"endpoint": "token", "mode": "5xx", "count": 1}).status_code == 200
    assert http.get("/_admin/faults").json()["token"]["mode"] == "5xx"
    assert http.post("/_admin/faults", json={"endpoint": "token", "mode": None}).status_code == 200
    assert http.get("/_admin/faults").json() == {}
    assert http.post("/_admin/faults", json={"endpoint": "token", "mode": "explode"}).status_code == 400
    assert http.post("/_admin/faults", json={"endpoint": "nowhere", "mode": "5xx"}).status_code == 400
    assert http.post("/_admin/latency", json={"endpoint": "token", "ms": 50}).json() == {"endpoint": "token", "ms": 50}
    config = http.post("/_admin/config", json={"access_token_ttl": 120, "rotate_refresh_tokens": False}).json()
    assert config == {"access_token_ttl": 120, "rotate_refresh_tokens": False, "clock_skew": 0}
    assert http.post("/_admin/config", json={"bogus": 1}).status_code == 400

    subject = http.post("/test/subject-token", json={"user_id": "gina"}).json()["access_token"]
    body = exchange(http, subject).json()
    assert body["expires_in"] == 120
    stats = http.get("/_admin/stats").json()
    assert stats["grants"]["token_exchange"] == 1 and stats["by_user"] == {"gina": {"token_exchange": 1}}
    recorded = http.get("/_admin/requests", params={"endpoint": "token"}).json()
    assert len(recorded) == 1 and recorded[0]["grant_type"] == TOKEN_EXCHANGE
    assert recorded[0]["client_id"] == CLIENT_ID and recorded[0]["client_auth"] == "client_secret_post"
    assert len(http.get("/_admin/requests").json()) == 2  # subject-token and token

    assert http.post("/_admin/reset").status_code == 200
    assert sandbox.provider.access_token_ttl == 3600 and sandbox.provider.rotate_refresh_tokens is True
    assert sandbox.provider.latency_seconds("token") == 0
    assert http.get("/_admin/stats").json()["grants"]["token_exchange"] == 0
    assert http.get("/_admin/requests").json() == []


def test_python_api_validation() -> None:
    provider = SandboxProvider()
    with pytest.raises(ValueError):
        provider.set_fault("token", "nope")
    with pytest.raises(ValueError):
        provider.set_latency("nowhere", 5)
    with pytest.raises(TypeError):
        provider.configure(issuer="x")


# -- as its own process --------------------------------------------------------------


def test_module_runs_as_a_process() -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.sandbox", "--host", "127.0.0.1", "--port", "0",
         "--access-token-ttl", "90", "--latency-ms", "5", "--no-rotate"],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "no URL line in time"
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=url, timeout=5.0, trust_env=False) as client:
            assert client.get("/.well-known/oauth-authorization-server").json()["issuer"] == url
            subject = client.post("/test/subject-token", json={"user_id": "henry"}).json()["access_token"]
            assert exchange(client, subject).json()["expires_in"] == 90
            assert client.get("/_admin/stats").json()["grants"]["token_exchange"] == 1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
            if proc.stdout:
                proc.stdout.close()
            if proc.stderr:
                proc.stderr.close()
