"""The broker against an independent authorization server: django-oauth-toolkit.

DOT (from PyPI) runs on loopback with refresh-token rotation, reuse
protection, PKCE required and RFC 7009 revocation; the broker is a real
cluster (Redis, a Celery worker process, its HTTP API under uvicorn) whose
only knowledge of DOT is its server config. Every claim about what the broker
sent is read from DOT's request recorder, not from our own client.

Users are separate per test (alice, bob, carol, dave), so the tests share one
DOT process and one cluster and stay within a few seconds each.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from broker.db import make_engine
from broker.sandbox.server import bind_socket, url_for
from broker.servers import servers_from_settings
from broker.store import CredentialStore
from tests.cluster import Cluster, redis_available
from tests.conftest import missing_service
from tests.integration.test_api import KEY, Api, Served
from tests.interop.dot import DotServer, complete_connect
from tests.secrets import assert_no_leak, canary, register
from workers.api import create_app

pytestmark = [pytest.mark.integration, pytest.mark.interop]

SERVER = "dot"
DISCOVERED = "dot-issuer"  # the same DOT, known only by its issuer (RFC 8414 metadata)
USERS = ["alice", "bob", "carol", "dave", "erin"]
PASSWORD = "interop-password-not-a-broker-secret"
REFRESH_CYCLES = 5
# What an RFC 6749 §6 refresh grant with client_secret_post carries: no scope.
REFRESH_FIELDS = ["client_id", "client_secret", "grant_type", "refresh_token"]


def fingerprint(token: str) -> str:
    """As DOT's recorder writes it (tests/interop/dot_server/recorder.py)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def dot_servers(dot_url: str, client_secret: str) -> list[dict[str, Any]]:
    """The broker's whole knowledge of DOT: servers-file entries, nothing else."""
    client = {"mode": "oauth_connect", "client_id": "credential-broker", "client_secret": client_secret,
              "scopes": ["read", "write"]}
    return [
        {"name": SERVER, "url": "https://dot.upstream.test/mcp", "auth_broker": {
            **client,
            "authorization_endpoint": f"{dot_url}/o/authorize/",
            "token_endpoint": f"{dot_url}/o/token/",
            "revocation_endpoint": f"{dot_url}/o/revoke_token/",
        }},
        {"name": DISCOVERED, "url": "https://dot-issuer.upstream.test/mcp", "auth_broker": {
            **client, "issuer": dot_url,
        }},
    ]


@dataclass
class Interop:
    dot: DotServer
    cluster: Cluster
    api: Api
    store: CredentialStore
    server_keys: dict[str, str]
    # Tokens seen in this test, registered with the secret guard when it ends
    # (not at once: the API's own leak check would refuse a stale token served twice).
    seen: list[str]

    def connect(self, user: str, server: str = SERVER) -> httpx.Response:
        """POST /v1/connect, then the user's browser through DOT and back."""
        started = self.api("POST", "/v1/connect", json={"user_id": user, "server": server})
        assert started.status_code == 200, started.text
        return complete_connect(started.json()["connect_url"], dot_url=self.dot.url, username=user,
                                password=PASSWORD)

    def tokens(self, user: str, server: str = SERVER) -> tuple[str, str]:
        """The (access, refresh) tokens the broker holds for ``user``."""
        stored = self.store.get(user, self.server_keys[server])
        assert stored is not None and stored.credential.refresh_token is not None
        access = stored.credential.access_token.reveal()
        refresh = stored.credential.refresh_token.reveal()
        self.seen += [access, refresh]
        return access, refresh

    def resolve_token(self, user: str, server: str = SERVER) -> str:
        r = self.api.resolve(user, server)
        assert r.status_code == 200, r.text
        access = r.json()["value"].removeprefix("Bearer ")
        self.seen.append(access)
        return access

    def status(self, user: str, server: str = SERVER) -> str:
        return str(self.api.listing(user)[server]["status"])


@pytest.fixture(scope="module")
def interop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Interop]:
    if not redis_available("redis://127.0.0.1:6379/0"):
        missing_service("Redis at 127.0.0.1:6379")
    workdir = tmp_path_factory.mktemp("interop")
    sock = bind_socket("127.0.0.1", 0)  # first: DOT must know the callback as the redirect URI
    api_url = url_for(sock)
    client_secret = canary("dot-client-secret")
    dot = DotServer(workdir, redirect_uri=f"{api_url}/v1/connect/callback", client_id="credential-broker",
                    client_secret=client_secret, users=USERS, password=PASSWORD, access_token_seconds=30)
    cluster = served = None
    try:
        # 30 s access tokens, renewed 60 s before expiry: every resolve is a refresh.
        cluster = Cluster(workdir, dot.url, servers=dot_servers(dot.url, client_secret), extra_env={
            "CREDBROKER_API_KEYS": KEY, "CREDBROKER_PUBLIC_URL": api_url,
            "CREDBROKER_NEAR_EXPIRY_SECONDS": "60"})
        cluster.start_worker(concurrency=2)
        served = Served(create_app(cluster.settings), sock)
        engine = make_engine(cluster.settings.database_url)
        store = CredentialStore(engine, cluster.settings.keyring)
        registry = servers_from_settings(cluster.settings)
        server_keys = {name: registry.get_server(name).key for name in (SERVER, DISCOVERED)}
        with Api(served.url) as api:
            yield Interop(dot, cluster, api, store, server_keys, [])
        engine.dispose()
        assert_no_leak(cluster.all_logs(), "worker logs")
        assert_no_leak(dot.log(), "DOT's log")
    finally:
        if served is not None:
            served.stop()
        if cluster is not None:
            cluster.stop()
        dot.stop()


@pytest.fixture(autouse=True)
def register_seen_tokens(interop: Interop) -> Iterator[None]:
    """Runs before the secret guard's check: every token this test saw is scanned for."""
    yield
    for token in interop.seen:
        register(token)
    interop.seen.clear()


def test_connect_flow_redeems_the_code_with_pkce_at_dot(interop: Interop) -> None:
    never = interop.api.resolve("alice", SERVER)
    assert never.status_code == 409 and never.json()["reason"] == "never_connected"
    # Browser mode: the link starts at the broker, which binds the browser and redirects to DOT.
    assert never.json()["connect_url"].startswith(f"{interop.cluster.settings.public_url}/v1/connect/open?state=")

    page = interop.connect("alice")

    assert page.status_code == 200 and "Connected" in page.text, page.text[:500]
    (redeem,) = interop.dot.records(user="alice", grant_type="authorization_code")
    assert redeem["status"] == 200 and redeem["auth"] == "post"
    assert redeem["fields"] == ["client_id", "client_secret", "code", "code_verifier", "grant_type", "redirect_uri"]
    assert redeem["scope_granted"] == "read write"
    listing = interop.api.listing("alice")[SERVER]
    assert listing["status"] == "connected" and listing["obtained_via"] == "connect_flow"
    assert sorted(listing["scopes"]) == ["read", "write"]
    access, refresh = interop.tokens("alice")
    assert fingerprint(refresh) == redeem["issued"]  # the broker keeps exactly what DOT issued
    who = interop.dot.whoami(access)
    assert who.status_code == 200 and who.json() == {"user": "alice"}
    assert interop.dot.refreshes("alice") == []  # nothing spent yet


def test_five_rotating_refreshes_without_scope_and_without_reuse(interop: Interop) -> None:
    interop.connect("bob")
    (redeem,) = interop.dot.records(user="bob", grant_type="authorization_code")
    first_access, first_refresh = interop.tokens("bob")

    seen = [first_access]
    for cycle in range(1, REFRESH_CYCLES + 1):
        access = interop.resolve_token("bob")
        assert access not in seen, f"cycle {cycle}: no new access token"
        seen.append(access)
        who = interop.dot.whoami(access)
        assert who.status_code == 200 and who.json() == {"user": "bob"}, f"cycle {cycle}: {who.status_code}"
        assert len(interop.dot.refreshes("bob")) == cycle

    refreshes = interop.dot.refreshes("bob")
    assert [r["status"] for r in refreshes] == [200] * REFRESH_CYCLES
    assert [r["fields"] for r in refreshes] == [REFRESH_FIELDS] * REFRESH_CYCLES  # `scope` in none of them
    presented = [r["presented"] for r in refreshes]
    assert len(set(presented)) == REFRESH_CYCLES  # no refresh token presented twice
    # Each refresh spends the token the previous answer issued: the rotation chain is unbroken.
    assert presented == [redeem["issued"], *(r["issued"] for r in refreshes[:-1])]
    assert fingerprint(interop.tokens("bob")[1]) == refreshes[-1]["issued"]
    assert interop.status("bob") == "connected"

    # DOT's reuse protection is really on: a retired token revokes the whole family.
    replay = interop.dot.refresh_directly(first_refresh)
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    assert interop.dot.whoami(seen[-1]).status_code == 403


def test_disconnect_revokes_at_dot(interop: Interop) -> None:
    interop.connect("carol")
    access, refresh = interop.tokens("carol")
    assert interop.dot.whoami(access).status_code == 200
    before = len(interop.dot.records())

    assert interop.api("DELETE", f"/v1/users/carol/credentials/{SERVER}").status_code == 204

    revocations = [r for r in interop.dot.records()[before:] if r["endpoint"] == "revoke"]
    assert [(r["token_type_hint"], r["status"]) for r in revocations] == [("refresh_token", 200),
                                                                         ("access_token", 200)]
    assert revocations[0]["presented"] == fingerprint(refresh) and revocations[0]["user"] == "carol"
    assert revocations[1]["presented"] == fingerprint(access)
    assert all(r["auth"] == "post" for r in revocations)
    dead = interop.dot.refresh_directly(refresh)
    assert dead.status_code == 400 and dead.json()["error"] == "invalid_grant"
    assert interop.dot.whoami(access).status_code == 403
    assert interop.status("carol") == "not_connected"
    assert interop.dot.refreshes("carol") == []


def test_revoked_grant_gets_one_invalid_grant_then_needs_reconnect(interop: Interop) -> None:
    interop.connect("dave")
    last_good = interop.resolve_token("dave")  # one good refresh first: the grant worked
    assert interop.dot.revoke_grants("dave") == 1  # the user revokes the app at DOT

    responses = [interop.api.resolve("dave", SERVER) for _ in range(6)]

    refreshes = interop.dot.refreshes("dave")
    assert [(r["status"], r.get("error")) for r in refreshes] == [(200, None), (400, "invalid_grant")]
    assert interop.status("dave") == "needs_reconnect"
    for r in responses:
        # The still-valid token served stale, or "reconnect": never another call to DOT.
        if r.status_code == 200:
            assert r.json()["value"] == f"Bearer {last_good}"
        else:
            assert (r.status_code, r.json()["reason"]) == (409, "reconnect_required"), r.text


def test_issuer_only_config_discovers_dot_and_refreshes_and_revokes(interop: Interop) -> None:
    interop.connect("erin", DISCOVERED)
    assert interop.status("erin", DISCOVERED) == "connected"
    access = interop.resolve_token("erin", DISCOVERED)
    assert interop.dot.whoami(access).status_code == 200
    (refresh,) = interop.dot.refreshes("erin")
    assert refresh["status"] == 200 and refresh["fields"] == REFRESH_FIELDS
    before = len(interop.dot.records())

    assert interop.api("DELETE", f"/v1/users/erin/credentials/{DISCOVERED}").status_code == 204

    revocations = [r for r in interop.dot.records()[before:] if r["endpoint"] == "revoke"]
    assert [r["status"] for r in revocations] == [200, 200]
    assert interop.dot.whoami(access).status_code == 403
