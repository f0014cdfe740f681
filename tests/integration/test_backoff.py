"""Failures and backoff with real workers, beat, Redis, PostgreSQL and four
sandbox providers over HTTP; every figure is counted at the providers.

One 30-second run covers the acceptance points at once:
- ``flaky`` answers every refresh with 503 and ``Retry-After: 2``: at most 8
  refresh requests per credential in 30 s of resolves every 0.5 s, at least
  2 s apart, and every resolve gets the still-valid credential;
- ``revoked`` answers ``invalid_grant``: one request per credential, then
  ``needs_reconnect``, still served while valid;
- ``healthy``: 10,000 failing ``flaky`` rows with the oldest refresh points do
  not keep the beat from renewing its due credentials;
- ``idle``: refresh tokens die after 15 s unused; an idle credential is kept
  alive by the beat, never once rejected.
The credentials live 60 s and are renewed from 3 s on (near expiry 57 s), so
no fast-path cache hides the workers: every resolve is a flight.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, text

from broker.clock import utcnow
from broker.db import credentials as T
from broker.db import make_engine
from broker.models import CredentialStatus
from sandbox import SandboxHandle, SandboxProvider, run_sandbox
from broker.servers import server_key
from tests.cluster import Cluster, wait_for
from tests.integration.test_cluster import connect, store_of
from tests.secrets import find_leaks, register

pytestmark = pytest.mark.integration

ENV = {
    "CREDBROKER_NEAR_EXPIRY_SECONDS": "57",
    "CREDBROKER_REFRESH_SCAN_SECONDS": "0.5",
    "CREDBROKER_REFRESH_JITTER_SECONDS": "0.2",
    # small, so the server's Retry-After is what spaces the first attempts
    "CREDBROKER_RENEWAL_BACKOFF_SECONDS": "1",
    # per-credential backoff is what this measures: keep the per-server circuit
    # breaker (which would pause the whole server sooner) out of it
    "CREDBROKER_BREAKER_FAILURES": "1000",
}
WINDOW, TICK, IDLE = 30.0, 0.5, 15
SECRET = "sandbox-client-secret-s3cr3t"
NAMES = ("flaky", "revoked", "healthy", "idle")


def _server(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": f"https://{name}.upstream.test/mcp",
            "auth_broker": {"mode": "oauth_connect", "token_endpoint": f"{url}/token",
                            "authorization_endpoint": f"{url}/authorize", "client_id": "broker-client",
                            "client_secret": SECRET, "scopes": ["repo"], **extra}}


@pytest.fixture
def providers() -> Iterator[dict[str, SandboxHandle]]:
    handles = {
        "flaky": run_sandbox(SandboxProvider(access_token_ttl=60)),
        "revoked": run_sandbox(SandboxProvider(access_token_ttl=60)),
        "healthy": run_sandbox(SandboxProvider(access_token_ttl=60)),
        "idle": run_sandbox(SandboxProvider(access_token_ttl=3600, refresh_idle_seconds=IDLE)),
    }
    try:
        yield handles
    finally:
        for h in handles.values():
            h.stop()


def refresh_times(handle: SandboxHandle, fault: str | None = None) -> dict[str, list[float]]:
    """When each refresh token was presented, by token; with ``fault``, only the
    requests answered by that fault (a token stays the same while refreshes fail,
    so it names one credential)."""
    seen: dict[str, list[float]] = defaultdict(list)
    for req in handle.provider.requests("token"):
        if req["grant_type"] == "refresh_token" and (fault is None or req["fault"] == fault):
            seen[req["form"]["refresh_token"]].append(req["at"])
    return dict(seen)


def test_backoff_permanent_failure_keepalive_and_fair_scan(tmp_path: Path, providers: dict[str, SandboxHandle],
                                                           pg_url: str) -> None:
    register(SECRET)
    servers = [_server(n, providers[n].url) for n in NAMES[:3]]
    servers.append(_server("idle", providers["idle"].url, refresh_token_idle_seconds=IDLE))
    keys = {s["name"]: server_key(s["name"], s["url"]) for s in servers}
    c = Cluster(tmp_path, providers["healthy"].url, database_url=pg_url, servers=servers, extra_env=ENV)
    callers = {"flaky": ["f1", "f2", "f3"], "revoked": ["r1", "r2"]}
    try:
        c.start_worker("w1", concurrency=4)
        for server, users in [*callers.items(), ("healthy", ["h1", "h2"])]:
            for u in users:
                connect(c, u, server)
        # 10,000 failing rows of flaky with the oldest refresh points, backing off
        now = utcnow()
        engine = make_engine(pg_url)
        with engine.begin() as conn:
            conn.execute(insert(T), [
                {"user_id": f"backlog-{i:05d}", "server_key": keys["flaky"], "ciphertext": b"x", "key_id": "test1",
                 "status": "degraded", "obtained_via": "connect_flow", "token_type": "Bearer", "scopes": "[]",
                 "expires_at": now + timedelta(hours=1), "refresh_at": now - timedelta(minutes=50, seconds=-i / 100),
                 "next_attempt_at": now + timedelta(hours=1), "failure_count": 5, "last_used_at": now,
                 "created_at": now, "updated_at": now, "version": 1} for i in range(10_000)])
            conn.execute(text("ANALYZE credentials"))
        with c.client() as client:
            served = {u: client.resolve(u, s, timeout=20).value for s, us in callers.items() for u in us}
            for u in ("h1", "h2"):
                client.resolve(u, "healthy", timeout=20)  # used recently: the beat keeps it fresh
            providers["flaky"].provider.set_fault("token", "503", retry_after=2)
            providers["revoked"].provider.set_fault("token", "invalid_grant")
            c.start_beat()
            connect(c, "ivy", "idle")  # never used again
            ivy_connected = time.time()
            healthy_before = {u: providers["healthy"].provider.stats()["by_user"][u].get("refresh_token", 0)
                              for u in ("h1", "h2")}

            wrong: list[str] = []
            started = time.monotonic()
            tick = started
            while time.monotonic() - started < WINDOW:
                for server, users in callers.items():
                    for u in users:
                        if client.resolve(u, server, timeout=20).value != served[u]:
                            wrong.append(u)
                tick += TICK
                time.sleep(max(0.0, tick - time.monotonic()))
            ivy_checked = time.time()

        # (a load-slowed setup may renew a credential before the faults are armed)
        flaky = refresh_times(providers["flaky"], "503")
        revoked = refresh_times(providers["revoked"], "invalid_grant")
        idle = sorted(t for ts in refresh_times(providers["idle"]).values() for t in ts)
        healthy_stats = providers["healthy"].provider.stats()
        store = store_of(c)
        rows = {(u, s): store.get(u, keys[s]) for s, us in [*callers.items(), ("idle", ["ivy"])] for u in us}
        store.engine.dispose()
        engine.dispose()
    finally:
        c.stop()

    # (a) every resolve got the still-valid credential; the provider saw at most
    # 8 refreshes per credential, each at least Retry-After (2 s) after the last
    assert wrong == []
    counts = {tok[-6:]: len(ts) for tok, ts in flaky.items()}
    print(f"\nflaky: refresh requests per credential in {WINDOW:.0f} s: {sorted(counts.values())}")
    assert len(flaky) == 3 and all(2 <= n <= 8 for n in counts.values()), counts
    gaps = [b - a for ts in flaky.values() for a, b in zip(ts, ts[1:])]
    print(f"flaky: shortest gap between attempts {min(gaps):.2f} s")
    assert min(gaps) >= 1.95, gaps
    for u in callers["flaky"]:
        row = rows[(u, "flaky")]
        assert row is not None and row.status is CredentialStatus.DEGRADED and row.failure_count >= 3
    # (b) invalid_grant: one request per credential, then needs_reconnect
    assert sorted(len(ts) for ts in revoked.values()) == [1, 1]
    assert all(rows[(u, "revoked")].status is CredentialStatus.NEEDS_RECONNECT for u in callers["revoked"])
    # (c) the idle credential was renewed before its refresh token died of disuse
    marks = [ivy_connected, *idle, ivy_checked]
    print(f"idle: keep-alive refreshes {len(idle)}, longest idle gap {max(b - a for a, b in zip(marks, marks[1:])):.1f} s")
    assert len(idle) >= 2
    assert all(b - a < IDLE for a, b in zip(marks, marks[1:])), marks
    assert providers["idle"].provider.stats()["errors"].get("invalid_grant", 0) == 0
    assert rows[("ivy", "idle")].status is CredentialStatus.CONNECTED
    # (d) the healthy server's due credentials were renewed by the beat all along
    renewed = {u: healthy_stats["by_user"][u]["refresh_token"] - healthy_before[u] for u in ("h1", "h2")}
    print(f"healthy: beat refreshes per credential beside 10,000 failing rows: {renewed}")
    assert all(n >= 4 for n in renewed.values()), renewed
    for h in providers.values():
        with h.provider.lock:
            for tok in h.provider.store.refresh:  # (codes: this test's own browser step logs them)
                register(tok)
    assert find_leaks(c.all_logs()) == []


def test_scans_use_their_indexes_on_postgresql(pg_url: str) -> None:
    """Per-server due scan and keep-alive scan: index range scans, so the cost
    follows the number due, not the 40,000 rows stored."""
    from broker.store import CredentialStore

    engine = make_engine(pg_url)
    now = utcnow()
    with engine.begin() as conn:
        for s in range(4):
            conn.execute(insert(T), [
                {"user_id": f"u{i}", "server_key": f"{s}" * 64, "ciphertext": b"x", "key_id": "A",
                 "status": "connected", "obtained_via": "connect_flow", "token_type": "Bearer", "scopes": "[]",
                 "expires_at": now + timedelta(seconds=i), "refresh_at": now + timedelta(seconds=i - 600),
                 "keepalive_at": now + timedelta(seconds=i - 60), "last_used_at": now, "created_at": now,
                 "updated_at": now, "version": 1} for i in range(10_000)])
        conn.execute(text("ANALYZE credentials"))
    store = CredentialStore(engine, None)
    plans = {}
    for name, stmt in [("due", store.due_statement(now, now - timedelta(hours=1), 2500, server_key="1" * 64)),
                       ("keepalive", store.keepalive_statement(now, 1000))]:
        compiled = stmt.compile(engine, compile_kwargs={"literal_binds": True})
        with engine.connect() as conn:
            plans[name] = "\n".join(r[0] for r in conn.execute(text("EXPLAIN " + str(compiled))))
    engine.dispose()
    assert "ix_credentials_server_refresh_at" in plans["due"], plans["due"]
    assert "ix_credentials_keepalive_at" in plans["keepalive"], plans["keepalive"]


def test_a_failed_proactive_refresh_keeps_the_good_cache_entry(tmp_path: Path, providers: dict[str, SandboxHandle],
                                                               pg_url: str) -> None:
    """The beat's refresh fails; callers stay on the fast path with the cached
    credential instead of being sent to the failing provider."""
    from workers.common.constants import cache_key
    from workers.common.metrics import METRICS

    register(SECRET)
    handle = providers["healthy"]
    handle.provider.configure(access_token_ttl=40)  # refresh point 8 s (20 %), cached until 38 s
    server = _server("healthy", handle.url)
    c = Cluster(tmp_path, handle.url, database_url=pg_url, servers=[server],
                extra_env={"CREDBROKER_NEAR_EXPIRY_SECONDS": "2", "CREDBROKER_REFRESH_FRACTION": "0.2",
                           "CREDBROKER_REFRESH_SCAN_SECONDS": "0.5", "CREDBROKER_REFRESH_JITTER_SECONDS": "0.1"})
    try:
        c.start_worker("w1", concurrency=2)
        connect(c, "alice", "healthy")
        key = cache_key("alice", server_key("healthy", server["url"]))
        with c.client() as client:
            first = client.resolve("alice", "healthy", timeout=20)  # a flight; cached from here on
            handle.provider.set_fault("token", "503", retry_after=2)
            c.start_beat()
            wait_for(lambda: refresh_times(handle, "503"), 30, 0.1, what="the beat's refresh attempt")
            store = store_of(c)
            try:  # the failed flight has written its backoff (and left the cache alone)
                wait_for(lambda: (row := store.get("alice", server_key("healthy", server["url"]))) is not None
                         and row.failure_count >= 1, 20, 0.1, what="the failed refresh to be recorded")
            finally:
                store.engine.dispose()
            flights = METRICS.value("credbroker_resolves_total", outcome="ok", path="flight")
            for _ in range(20):
                assert client.resolve("alice", "healthy", timeout=20).value == first.value
            ttl_ms = c.redis.pttl(key)
            assert METRICS.value("credbroker_resolves_total", outcome="ok", path="flight") == flights
    finally:
        c.stop()
    # until 2 s before expiry, not a 5-second stale entry
    assert ttl_ms > 15_000, ttl_ms
    assert all(len(ts) <= 2 for ts in refresh_times(handle, "503").values())
    with handle.provider.lock:
        for tok in handle.provider.store.refresh:
            register(tok)
    assert find_leaks(c.all_logs()) == []
