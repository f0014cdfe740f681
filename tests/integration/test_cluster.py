"""Resolve across a real cluster: workers and beat as processes, Redis, the
sandbox provider over HTTP. Covers single-flight, proactive refresh with
rotating refresh tokens, a worker killed mid-flight, and secrets in Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from broker.clock import utcnow
from broker.db import make_engine
from broker.errors import NotConnected, PolicyDenied, ResolveTimeout, StoreDisabled, SubjectTokenMissing, UnknownServer
from broker.models import CredentialStatus, SubjectToken
from broker.secret import Secret
from broker.servers import server_key
from broker.store import CredentialStore
from tests.cluster import Cluster, read_all_redis, wait_for
from tests.secrets import assert_no_leak, find_leaks, register

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def store_of(cluster: Cluster) -> CredentialStore:
    return CredentialStore(make_engine(cluster.settings.database_url), cluster.settings.keyring)


def sign_in(cluster: Cluster, sandbox: Any, user: str, ttl: int = 3600) -> str:
    token = register(sandbox.provider.issue_subject_token(user, ttl=ttl))
    store = store_of(cluster)
    store.put_subject_token(user, SubjectToken(Secret(token), utcnow() + timedelta(seconds=ttl)))
    store.engine.dispose()
    return token


def connect(cluster: Cluster, user: str, server: str = "gh") -> None:
    """Run the connect flow for a user as a browser would."""
    from workers.runtime import build_runtime

    rt = build_runtime(cluster.settings)
    try:
        url = rt.connect.start(user, server).connect_url  # type: ignore[union-attr]
    finally:
        rt.close()
    _complete(cluster, url, user)


def _complete(cluster: Cluster, url: str, user: str) -> None:
    """Browser mode, the steps of the broker's routes: open the link (the cookie),
    consent, the callback with the cookie, the confirming click."""
    from workers.runtime import build_runtime

    rt = build_runtime(cluster.settings)
    try:
        flow = rt.connect
        assert flow is not None
        opened = flow.open(parse_qs(urlsplit(url).query)["state"][0])
        answer = httpx.get(opened.authorize_url + "&consent=approve&user=" + user, follow_redirects=False)
        assert answer.status_code in (302, 303)
        q = parse_qs(urlsplit(answer.headers["location"]).query)
        flow.callback(q["state"][0], q["code"][0], cookie=opened.cookie_value)
        flow.confirm(q["state"][0], opened.cookie_value)
    finally:
        rt.close()


def provider_tokens(sandbox: Any) -> None:
    """Register every token the provider issued, for the leak scans."""
    for req in sandbox.provider.requests("token"):
        for field in ("subject_token", "assertion", "refresh_token"):
            value = req.get("form", {}).get(field)
            if isinstance(value, str):
                register(value)


def test_every_mode_end_to_end_and_isolation(cluster: Cluster, sandbox: Any) -> None:
    cluster.start_worker()
    sign_in(cluster, sandbox, "alice")
    with cluster.client() as client:
        tx = client.resolve("alice", "tx", timeout=20)
        obo = client.resolve("alice", "obo", timeout=20)
        assert tx.obtained_via == "token_exchange" and obo.obtained_via == "entra_obo"
        register(tx.value.reveal()[7:])
        register(obo.value.reveal()[7:])
        with pytest.raises(NotConnected) as info:
            client.resolve("alice", "gh", timeout=20)
        assert info.value.reason == "never_connected"
        assert info.value.connect_url and info.value.connect_url.startswith(
            cluster.settings.public_url + "/v1/connect/open?state=")
        # the live state in the connect URL is a secret: it crossed Redis sealed
        state = parse_qs(urlsplit(info.value.connect_url).query)["state"][0]
        register(state)
        assert find_leaks(read_all_redis(cluster.redis)) == []
        # a gateway asking again gets the same live link, not a new state per call
        with pytest.raises(NotConnected) as again:
            client.resolve("alice", "gh", timeout=20)
        assert again.value.connect_url == info.value.connect_url
        assert len(cluster.redis.keys("credbroker:connect:*")) == 1
        connect(cluster, "alice")  # a flow of its own: the pending link above stays unused
        gh = client.resolve("alice", "gh", timeout=20)
        assert gh.obtained_via == "connect_flow"
        register(gh.value.reveal()[7:])
        # bob gets nothing of alice's
        with pytest.raises(SubjectTokenMissing):
            client.resolve("bob", "tx", timeout=20)
        with pytest.raises(NotConnected) as bob_nc:
            client.resolve("bob", "gh", timeout=20)
        # bob follows the link the error carried; once used, the next error carries a new one
        _complete(cluster, bob_nc.value.connect_url or "", "bob")
        assert client.resolve("bob", "gh", timeout=20).obtained_via == "connect_flow"
        from workers.credentials import remove_credential
        from workers.runtime import build_runtime

        rt = build_runtime(cluster.settings)
        try:
            assert remove_credential(rt, "bob", "gh")
        finally:
            rt.close()
        with pytest.raises(NotConnected) as bob_again:
            client.resolve("bob", "gh", timeout=20)
        assert bob_again.value.connect_url and bob_again.value.connect_url != bob_nc.value.connect_url
        with pytest.raises(UnknownServer):
            client.resolve("alice", "nope", timeout=20)
        sign_in(cluster, sandbox, "bob")
        bob = client.resolve("bob", "tx", timeout=20)
        assert bob.value != tx.value
        assert client.resolve("alice", "tx", timeout=20).value == tx.value  # fast path
    provider_tokens(sandbox)
    assert_no_leak(cluster.all_logs(), "worker logs")


def test_policy_deny_in_the_calling_process(cluster: Cluster, sandbox: Any) -> None:
    cluster.start_worker()
    sign_in(cluster, sandbox, "alice")
    with cluster.client(policy=lambda data: (data.server != "obo", "obo is off limits")) as client:
        assert client.resolve("alice", "tx", timeout=20).server == "tx"
        with pytest.raises(PolicyDenied, match="off limits"):
            client.resolve("alice", "obo", timeout=20)


def test_store_disabled_is_clear(tmp_path: Path, sandbox: Any) -> None:
    c = Cluster(tmp_path, sandbox.url, extra_env={"CREDBROKER_MASTER_KEYS": ""})
    try:
        c.start_worker()
        with c.client() as client:
            with pytest.raises(StoreDisabled):
                client.resolve("alice", "tx", timeout=20)
    finally:
        c.stop()


def test_stale_if_error_through_the_cluster(tmp_path: Path, sandbox: Any) -> None:
    c = Cluster(tmp_path, sandbox.url, extra_env={"CREDBROKER_NEAR_EXPIRY_SECONDS": "1",
                                                  "CREDBROKER_REFRESH_FRACTION": "0.5"})
    try:
        c.start_worker()
        sign_in(c, sandbox, "alice")
        sandbox.provider.configure(access_token_ttl=6)
        with c.client() as client:
            first = client.resolve("alice", "tx", timeout=20)
            sandbox.provider.set_fault("token", "5xx")
            # past the refresh point, before expiry: the cached copy is served stale
            wait_for(lambda: (utcnow() - (first.expires_at - timedelta(seconds=6))).total_seconds() > 3.2, 10)
            c.redis.delete(*c.redis.keys("credbroker:cache:*"))
            stale = client.resolve("alice", "tx", timeout=20)
            assert stale.value == first.value
            store = store_of(c)
            rec = store.get("alice", server_key("tx", "https://tx.upstream.test/mcp"))
            store.engine.dispose()
            assert rec is not None and rec.status is CredentialStatus.DEGRADED
            sandbox.provider.set_fault("token", None)
            wait_for(lambda: client.resolve("alice", "tx", timeout=20).value != first.value, 15, 0.2,
                     what="a renewed credential once the provider recovers")
    finally:
        c.stop()


def _burst(cluster: Cluster, procs: int, threads: int, user: str, server: str) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDBROKER_")}
    env.update(cluster.env)
    start_at = time.time() + 3.0
    children = [
        subprocess.Popen([sys.executable, "-m", "tests.procs.burst", user, server, str(threads), "30", str(start_at)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(ROOT))
        for _ in range(procs)
    ]
    out = []
    for child in children:
        stdout, stderr = child.communicate(timeout=90)
        assert child.returncode == 0, stderr.decode()[-2000:]
        assert_no_leak(stderr.decode(), "client process stderr")
        out.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    return out


def test_single_flight_across_processes(cluster: Cluster, sandbox: Any) -> None:
    cluster.start_worker("w1", concurrency=2)
    cluster.start_worker("w2", concurrency=2)
    sign_in(cluster, sandbox, "carol")
    sandbox.provider.set_latency("token", 300)  # a window wide enough for every caller to join
    results = _burst(cluster, procs=4, threads=50, user="carol", server="tx")
    digests = [d for r in results for d in r["digests"]]
    errors = [e for r in results for e in r["errors"]]
    assert errors == []
    assert len(digests) == 200 and len(set(digests)) == 1
    assert sandbox.provider.stats()["grants"]["token_exchange"] == 1
    assert sum(r["started"] for r in results) >= 1


def test_worker_killed_mid_flight(tmp_path: Path, sandbox: Any) -> None:
    c = Cluster(tmp_path, sandbox.url)
    try:
        c.start_worker("victim", concurrency=1)
        sign_in(c, sandbox, "dave")
        sandbox.provider.set_latency("token", 4000)
        outcomes: list[Any] = []
        with c.client() as client:
            def call() -> None:
                t0 = time.monotonic()
                try:
                    outcomes.append((client.resolve("dave", "tx", timeout=25), time.monotonic() - t0))
                except Exception as exc:  # noqa: BLE001
                    outcomes.append((exc, time.monotonic() - t0))

            threads = [threading.Thread(target=call) for _ in range(10)]
            for t in threads:
                t.start()
            # The task holds the flight (its heartbeat TTL is set) and is in the 4 s provider call.
            claims = c.redis.keys("credbroker:flight:*")
            wait_for(lambda: (k := c.redis.keys("credbroker:flight:*")) and 0 < c.redis.pttl(k[0]) <= 6000, 15,
                     what="the task to take its flight")
            del claims
            c.kill("victim")
            c.start_worker("rescuer", concurrency=1)
            sandbox.provider.set_latency("token", 0)
            for t in threads:
                t.join(40)
            assert len(outcomes) == 10
            for value, took in outcomes:
                assert took < 25 + 2
                assert not isinstance(value, Exception) or isinstance(value, ResolveTimeout), value
            got = [v for v, _ in outcomes if not isinstance(v, Exception)]
            assert got, "no waiter received a credential"
            assert len({g.value for g in got}) == 1
            after = client.resolve("dave", "tx", timeout=20)
            assert after.value == got[0].value
        store = store_of(c)
        rec = store.list("dave")
        assert len(rec) == 1 and rec[0].status is CredentialStatus.CONNECTED
        assert "Bearer " + rec[0].credential.access_token.reveal() == after.value.reveal()
        store.engine.dispose()
    finally:
        c.stop()
