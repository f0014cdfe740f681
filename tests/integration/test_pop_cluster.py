"""DPoP and private_key_jwt through the whole stack: the HTTP API and the
BrokerClient in front of a real Celery worker, Redis, the database and the
sandbox, which verifies every assertion and proof and serves the resource.

The DPoP proof for the upstream request is minted in the caller's process
(the API's, or the gateway's BrokerClient on the fast path), with the key
that reached it sealed under the transport key.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from broker.db import make_engine
from broker.jose import SigningKey, generate_private_key, private_pem
from broker.sandbox import SandboxHandle, run_sandbox
from broker.servers import servers_from_settings
from broker.store import CredentialStore
from tests.cluster import Cluster, read_all_redis, redis_available
from tests.conftest import missing_service
from tests.integration.test_api import KEY, Api, Served
from broker.sandbox import SandboxProvider
from tests.secrets import assert_no_leak, register
from workers.api import create_app

pytestmark = pytest.mark.integration


class IssuingProvider(SandboxProvider):
    """Keeps what it issues, to register with the secret guard at the end: the
    API hands tokens to its caller by design, so they cannot be canaries while it runs."""

    issued: list[str] = []

    def bind_to_dpop_key(self, body: dict[str, Any], jkt: str) -> dict[str, Any]:
        bound = super().bind_to_dpop_key(body, jkt)
        self.issued.append(bound["access_token"])
        return bound


@dataclass
class Stack:
    cluster: Cluster
    sandbox: SandboxHandle
    api: Api

    @property
    def resource(self) -> str:
        return f"{self.sandbox.url}/test/resource"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not redis_available("redis://127.0.0.1:6379/0"):
        missing_service("Redis at 127.0.0.1:6379")
    workdir = tmp_path_factory.mktemp("pop")
    key = SigningKey.of(generate_private_key("ES256"))
    pem_path = workdir / "client.pem"
    pem_path.write_text(register(private_pem(key.key)))
    sandbox = run_sandbox(IssuingProvider(clients={}, client_jwks={"pkj-client": key.public_jwk()},
                                      dpop_nonce="cluster-nonce"))
    servers = [{"name": "dp", "url": "https://dp.upstream.test/mcp", "auth_broker": {
        "mode": "token_exchange", "token_endpoint": f"{sandbox.url}/token", "client_id": "pkj-client",
        "client_auth": "private_key_jwt", "client_assertion_key_file": str(pem_path), "dpop": True}}]
    cluster = Cluster(workdir, sandbox.url, servers=servers, extra_env={"CREDBROKER_API_KEYS": KEY})
    served = None
    try:
        cluster.start_worker(concurrency=2)
        served = Served(create_app(cluster.settings))
        api = Api(served.url)
        yield Stack(cluster, sandbox, api)
        api.close()
        for token in IssuingProvider.issued:
            register(token)
        assert_no_leak(cluster.all_logs(), "worker logs")
    finally:
        if served is not None:
            served.stop()
        cluster.stop()
        sandbox.stop()


def sign_in(stack: Stack, user: str) -> None:
    token = register(stack.sandbox.provider.issue_subject_token(user))
    expires = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    r = stack.api("PUT", f"/v1/users/{user}/subject-token", json={"token": token, "expires_at": expires})
    assert r.status_code == 204


def test_http_resolve_returns_a_proof_the_resource_accepts(stack: Stack) -> None:
    provider = stack.sandbox.provider
    sign_in(stack, "alice")
    missing = stack.api.resolve("alice", "dp")
    assert missing.status_code == 422 and "method and url" in missing.json()["message"]
    bad = stack.api.resolve("alice", "dp", method="GET", url="not a url")
    assert bad.status_code == 422

    r = stack.api.resolve("alice", "dp", method="POST", url=stack.resource + "?q=1")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["value"].startswith("DPoP ") and body["token_type"] == "DPoP"
    assert body["dpop"]["header"] == "DPoP"
    headers = {body["header"]: body["value"], "DPoP": body["dpop"]["value"]}
    ok = httpx.post(stack.resource + "?q=1", headers=headers)
    assert ok.status_code == 200 and ok.json()["sub"] == "alice"
    assert httpx.post(stack.resource, headers=headers).status_code == 401  # a proof is single-use

    # The worker's token request: private_key_jwt, and a DPoP proof retried once for the nonce.
    calls = provider.requests("token")
    assert len(calls) == 2 and {c["client_auth"] for c in calls} == {"private_key_jwt"}
    stats = provider.stats()
    assert stats["errors"] == {"use_dpop_nonce": 1} and stats["dpop_bound_tokens"] == 1

    # Again (now from the cache): the same token, a new proof, no new token request.
    again = stack.api.resolve("alice", "dp", method="GET", url=stack.resource).json()
    assert again["value"] == body["value"] and again["dpop"]["value"] != body["dpop"]["value"]
    assert httpx.get(stack.resource, headers={"Authorization": again["value"],
                                              "DPoP": again["dpop"]["value"]}).status_code == 200
    assert len(provider.requests("token")) == 2

    # A resource server's nonce goes into the proof; a malformed one is refused.
    provider.configure(resource_dpop_nonce="rs-n1")
    with_nonce = stack.api.resolve("alice", "dp", method="GET", url=stack.resource, dpop_nonce="rs-n1").json()
    assert httpx.get(stack.resource, headers={"Authorization": with_nonce["value"],
                                              "DPoP": with_nonce["dpop"]["value"]}).status_code == 200
    provider.configure(resource_dpop_nonce=None)
    assert stack.api.resolve("alice", "dp", method="GET", url=stack.resource, dpop_nonce="a b").status_code == 422


def test_broker_client_mints_proofs_in_process_and_redis_holds_no_key(stack: Stack) -> None:
    provider = stack.sandbox.provider
    sign_in(stack, "bob")
    before = len(provider.requests("token"))
    with stack.cluster.client() as client:
        first = client.resolve("bob", "dp", method="GET", url=stack.resource)  # the flight
        assert len(provider.requests("token")) == before + 1  # the nonce is known by now: one request
        proofs = set()
        for _ in range(5):  # the fast path: the key came sealed in the cache envelope
            resolved = client.resolve("bob", "dp", method="GET", url=stack.resource)
            assert resolved.value == first.value and resolved.dpop is not None
            proofs.add(resolved.dpop.reveal())
            assert httpx.get(stack.resource, headers=resolved.apply({})).status_code == 200
        assert len(proofs) == 5 and len(provider.requests("token")) == before + 1
        extra = first.dpop_proof("DELETE", stack.resource)
        r = httpx.delete(stack.resource, headers={"Authorization": first.value.reveal(), "DPoP": extra.reveal()})
        assert r.status_code == 200
    # The private key is sealed at rest and in Redis: never in plaintext.
    settings = stack.cluster.settings
    engine = make_engine(settings.database_url)
    store = CredentialStore(engine, settings.keyring)
    stored = store.get("bob", servers_from_settings(settings)["dp"].key)
    engine.dispose()
    assert stored is not None and stored.credential.dpop_key is not None
    d = register(stored.credential.dpop_key.to_private_jwk()["d"])
    assert d not in read_all_redis(stack.cluster.redis)
    assert_no_leak(read_all_redis(stack.cluster.redis), "Redis")
    assert provider.decode_token(stored.credential.access_token.reveal())["cnf"]["jkt"] == \
        stored.credential.dpop_key.thumbprint
