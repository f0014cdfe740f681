"""``mode: identity_assertion`` (SEP-990 / ID-JAG) across a real cluster, the sandbox playing both legs.

Leg 1 at the "enterprise IdP" (token exchange for an ID-JAG), leg 2 at the
"upstream AS" (jwt-bearer with the ID-JAG): the sandbox counts each, so the
single flight, the cache and the re-mint are read at the provider.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import httpx
import pytest

from broker.sandbox.jwt import unverified_claims
from tests.cluster import Cluster
from tests.integration.test_cluster import sign_in
from tests.secrets import register

pytestmark = pytest.mark.integration

SECRET = "sandbox-client-secret-s3cr3t"
RESOURCE = "https://ia.upstream.test/mcp"


def ia_server(sandbox_url: str) -> dict[str, Any]:
    return {"name": "ia", "url": RESOURCE, "auth_broker": {
        "mode": "identity_assertion",
        "idp_token_endpoint": f"{sandbox_url}/token", "idp_client_id": "broker-client", "idp_client_secret": SECRET,
        "issuer": sandbox_url, "token_endpoint": f"{sandbox_url}/token",
        "client_id": "broker-client", "client_secret": SECRET, "resource": RESOURCE, "scopes": ["read"],
    }}


def test_both_legs_in_one_flight_cached_then_reminted(tmp_path: Any, sandbox: Any) -> None:
    cluster = Cluster(tmp_path, sandbox.url, servers=[ia_server(sandbox.url)])
    try:
        cluster.start_worker(concurrency=2)
        sign_in(cluster, sandbox, "alice")
        with cluster.client() as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: client.resolve("alice", "ia", timeout=20), range(8)))
            values = {a.value.reveal() for a in answers}
            for v in values:
                register(v[7:])
            assert len(values) == 1 and answers[0].obtained_via == "identity_assertion"
            claims = unverified_claims(values.pop()[7:])
            assert (claims["sub"], claims["aud"], claims["scope"]) == ("alice", RESOURCE, "read")
            assert sandbox.provider.stats()["by_user"]["alice"] == {"id_jag": 1, "id_jag_grant": 1}

            # Short-lived upstream tokens: each resolve past the refresh point re-mints both legs.
            sandbox.provider.configure(access_token_ttl=30)
            sign_in(cluster, sandbox, "bob")
            first = client.resolve("bob", "ia", timeout=20)
            second = client.resolve("bob", "ia", timeout=20)
            register(first.value.reveal()[7:])
            register(second.value.reveal()[7:])
            assert first.value.reveal() != second.value.reveal()
            assert unverified_claims(second.value.reveal()[7:])["sub"] == "bob"
            assert sandbox.provider.stats()["by_user"]["bob"] == {"id_jag": 2, "id_jag_grant": 2}
            assert sandbox.provider.stats()["by_user"]["alice"] == {"id_jag": 1, "id_jag_grant": 1}
    finally:
        cluster.stop()


def _leg1(http: httpx.Client, subject: str, audience: str) -> str:
    r = http.post("/token", data={
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "requested_token_type": "urn:ietf:params:oauth:token-type:id-jag",
        "subject_token": subject, "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
        "audience": audience, "resource": RESOURCE, "client_id": "broker-client", "client_secret": SECRET})
    assert r.status_code == 200, r.text
    assert r.json()["issued_token_type"] == "urn:ietf:params:oauth:token-type:id-jag"
    return register(str(r.json()["access_token"]))


def _leg2(http: httpx.Client, jag: str) -> httpx.Response:
    return http.post("/token", data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": jag,
                                     "client_id": "broker-client", "client_secret": SECRET})


def test_sandbox_rejects_a_replayed_or_misaddressed_id_jag(sandbox: Any) -> None:
    with httpx.Client(base_url=sandbox.url, timeout=10) as http:
        subject = register(sandbox.provider.issue_subject_token("carol"))
        jag = _leg1(http, subject, sandbox.url)
        assert _leg2(http, jag).status_code == 200
        replay = _leg2(http, jag)
        assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
        elsewhere = _leg1(http, subject, "https://other-as.example")
        wrong = _leg2(http, elsewhere)
        assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
        head, body, sig = jag.split(".")
        tampered = _leg2(http, f"{head}.{body}x.{sig}")
        assert tampered.status_code == 400 and tampered.json()["error"] == "invalid_grant"
