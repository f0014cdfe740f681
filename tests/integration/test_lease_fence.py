"""Issue 11, scenarios 1-4: a rotating refresh token is presented once, with real
workers, Redis, SQLite and the sandbox provider counting every refresh token it
receives (``refresh_presented_twice``). Each scenario presented a token twice,
or stranded or leaked one, before the lease fence."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from broker.clock import utcnow
from broker.errors import BrokerError, NotConnected
from broker.models import CredentialStatus, StoredCredential
from broker.servers import server_key
from tests.cluster import Cluster, wait_for
from tests.integration.test_cluster import connect, store_of
from workers.constants import AUDIT_STREAM, flight_key
from workers.metrics import CLUSTER_HASH

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
GH_KEY = server_key("gh", "https://gh.upstream.test/mcp")
# Due 2 s after issue, expired after 3 s: every resolve past 3 s needs the refresh token.
FAST = {"CREDBROKER_NEAR_EXPIRY_SECONDS": "1"}


def row(c: Cluster, user: str) -> StoredCredential | None:
    store = store_of(c)
    try:
        return store.get(user, GH_KEY)
    finally:
        store.engine.dispose()


def wait_expired(c: Cluster, user: str) -> None:
    rec = row(c, user)
    assert rec is not None and rec.credential.expires_at is not None
    wait_for(lambda: utcnow() >= rec.credential.expires_at, 10, 0.05, what="the access token to expire")  # type: ignore[operator]


def arrivals(sandbox: Any, endpoint: str = "token") -> int:
    return int(sandbox.provider.stats()["arrivals"].get(endpoint, 0))


def in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["ok"] = fn()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, out


def assert_presented_once(sandbox: Any) -> dict[str, Any]:
    stats = sandbox.provider.stats()
    assert stats["refresh_presented_twice"] == 0, stats
    assert stats["reuse_detected"] == 0, stats
    return stats


def test_scenario_1_a_redelivered_running_task_stands_down(tmp_path: Path, sandbox: Any) -> None:
    """The Redis transport redelivers the running task (visibility timeout 1 s) to
    a second worker; the copy finds another execution's claim and exits."""
    sandbox.provider.configure(access_token_ttl=3, rotate_refresh_tokens=True)
    c = Cluster(tmp_path, sandbox.url, extra_env={**FAST, "CREDBROKER_VISIBILITY_TIMEOUT": "1",
                                                  "CREDBROKER_HTTP_READ_TIMEOUT": "30"})
    try:
        c.start_worker("w1", concurrency=1)
        connect(c, "ann")
        wait_expired(c, "ann")
        sandbox.provider.set_latency("token", 9000)
        before = arrivals(sandbox)
        with c.client() as client:
            t, out = in_thread(lambda: client.resolve("ann", "gh", timeout=40))
            wait_for(lambda: arrivals(sandbox) > before, 10, what="the refresh call to start")
            started = time.monotonic()
            wait_for(lambda: time.monotonic() - started > 1.5, 3, what="the visibility timeout to pass")
            c.start_worker("w2", concurrency=1)  # restores unacknowledged messages on start
            wait_for(lambda: "received" in c.log("w2") and "broker.resolve" in c.log("w2"), 20,
                     what="the running task to be redelivered to w2")
            t.join(45)
            # the copy has finished one way or the other (a copy that ran has called the provider)
            wait_for(lambda: "superseded" in c.log("w2") or "succeeded" in c.log("w2"), 30,
                     what="the redelivered copy to finish")
        assert "ok" in out, out
        stats = assert_presented_once(sandbox)
        assert "superseded" in c.log("w2"), c.log("w2")[-2000:]
        assert stats["grants"]["refresh_token"] == 1
        rec = row(c, "ann")
        assert rec is not None and rec.status is CredentialStatus.CONNECTED
    finally:
        c.stop()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_scenario_2_a_lost_claim_mid_call_lets_no_second_flight_present(tmp_path: Path, sandbox: Any,
                                                                         database: str,
                                                                         request: pytest.FixtureRequest) -> None:
    """The claim key vanishes 0.5 s into a 2.5 s refresh; the next flight waits on
    the row's lease (in the database's clock, on SQLite and PostgreSQL) instead of
    presenting the same refresh token."""
    sandbox.provider.configure(access_token_ttl=3, rotate_refresh_tokens=True)
    url = request.getfixturevalue("pg_url") if database == "postgresql" else None
    c = Cluster(tmp_path, sandbox.url, database_url=url, extra_env=FAST)
    try:
        c.start_worker("w1", concurrency=2)
        connect(c, "bea")
        wait_expired(c, "bea")
        sandbox.provider.set_latency("token", 2500)
        before = arrivals(sandbox)
        with c.client() as first, c.client() as second:
            t1, out1 = in_thread(lambda: first.resolve("bea", "gh", timeout=20))
            wait_for(lambda: arrivals(sandbox) > before, 10, what="the refresh call to start")
            started = time.monotonic()
            wait_for(lambda: time.monotonic() - started >= 0.5, 2, what="0.5 s into the call")
            assert c.redis.delete(flight_key("bea", GH_KEY)) == 1
            t2, out2 = in_thread(lambda: second.resolve("bea", "gh", timeout=20))
            t1.join(30)
            t2.join(30)
        assert "ok" in out1 and "ok" in out2, (out1, out2)
        assert out1["ok"].value.reveal() == out2["ok"].value.reveal()  # the second served the first's
        assert_presented_once(sandbox)
        rec = row(c, "bea")
        assert rec is not None and rec.status is CredentialStatus.CONNECTED
        # and the stored refresh token is the live one: the next refresh works
        sandbox.provider.set_latency("token", 0)
        wait_expired(c, "bea")
        with c.client() as client:
            client.resolve("bea", "gh", timeout=20)
        assert_presented_once(sandbox)
    finally:
        c.stop()


def test_scenario_3_a_status_write_mid_refresh_strands_nothing(tmp_path: Path, sandbox: Any) -> None:
    """A status write lands between the flight's read and its write: the rotated
    token is still stored, so the next refresh presents the live one."""
    sandbox.provider.configure(access_token_ttl=3, rotate_refresh_tokens=True)
    c = Cluster(tmp_path, sandbox.url, extra_env=FAST)
    try:
        c.start_worker("w1", concurrency=1)
        connect(c, "cat")
        wait_expired(c, "cat")
        sandbox.provider.set_latency("token", 1500)
        before = arrivals(sandbox)
        with c.client() as client:
            t, out = in_thread(lambda: client.resolve("cat", "gh", timeout=20))
            wait_for(lambda: arrivals(sandbox) > before, 10, what="the refresh call to start")
            store = store_of(c)
            try:
                read = store.get("cat", GH_KEY)
                assert read is not None
                assert store.set_status("cat", GH_KEY, CredentialStatus.DEGRADED, failure="temporarily_unavailable")
            finally:
                store.engine.dispose()
            t.join(30)
            assert "ok" in out, out
            rec = row(c, "cat")
            assert rec is not None and rec.version == read.version + 1  # the rotation was stored
            assert rec.credential.access_token.reveal() in out["ok"].value.reveal()
            sandbox.provider.set_latency("token", 0)
            wait_expired(c, "cat")
            client.resolve("cat", "gh", timeout=20)  # presents the stored (rotated) refresh token
        assert_presented_once(sandbox)
        rec = row(c, "cat")
        assert rec is not None and rec.status is CredentialStatus.CONNECTED
    finally:
        c.stop()


def live_refresh_tokens(sandbox: Any, user: str) -> int:
    provider = sandbox.provider
    with provider.lock:
        store = provider.store
        return sum(1 for token, rec in store.refresh.items()
                   if store.families[rec.family_id].sub == user and store.refresh_active(token, rotation=True))


def test_scenario_4_disconnect_is_serialized_with_flights(tmp_path: Path, sandbox: Any) -> None:
    """Disconnect takes the row's lease: no flight rotates between its read and its
    delete, so what it revokes is the live token, and a flight that finds the row
    gone answers not_connected. The provider revokes single tokens (not families),
    so a leaked successor would stay live."""
    from workers.credentials import remove_credential
    from workers.runtime import build_runtime

    sandbox.provider.configure(access_token_ttl=3, rotate_refresh_tokens=True, revoke_family=False)
    c = Cluster(tmp_path, sandbox.url, extra_env=FAST)
    rt = build_runtime(c.settings)
    try:
        c.start_worker("w1", concurrency=2)
        connect(c, "dan")
        connect(c, "eve")
        wait_expired(c, "eve")
        assert live_refresh_tokens(sandbox, "dan") == 1 and live_refresh_tokens(sandbox, "eve") == 1
        with c.client() as client:
            # Disconnect first: it has read the row and is revoking (slowly) when a refresh starts.
            sandbox.provider.set_latency("revoke", 2000)
            sandbox.provider.set_latency("token", 300)
            before = arrivals(sandbox, "revoke")
            td, outd = in_thread(lambda: remove_credential(rt, "dan", "gh"))
            wait_for(lambda: arrivals(sandbox, "revoke") > before, 10, what="the revocation to start")
            tr, outr = in_thread(lambda: client.resolve("dan", "gh", timeout=20))
            td.join(30)
            tr.join(30)
            assert outd.get("ok") is True, outd
            assert isinstance(outr.get("error"), NotConnected), outr
            assert row(c, "dan") is None
            assert live_refresh_tokens(sandbox, "dan") == 0

            # A refresh first: disconnect waits for it, then revokes the token it stored.
            sandbox.provider.set_latency("revoke", 0)
            sandbox.provider.set_latency("token", 2000)
            before = arrivals(sandbox)
            tr, outr = in_thread(lambda: client.resolve("eve", "gh", timeout=20))
            wait_for(lambda: arrivals(sandbox) > before, 10, what="the refresh call to start")
            assert remove_credential(rt, "eve", "gh") is True
            tr.join(30)
            assert "ok" in outr or isinstance(outr.get("error"), BrokerError), outr
            assert row(c, "eve") is None
            assert live_refresh_tokens(sandbox, "eve") == 0
        assert_presented_once(sandbox)
    finally:
        rt.close()
        c.stop()


def test_a_kill_mid_call_is_reported_rotation_lost(tmp_path: Path, sandbox: Any) -> None:
    """A worker killed while the provider rotates: the response is lost. The next
    flight finds the lease expired unreleased, presents the old token once, and
    on invalid_grant reports rotation_lost: in the store, the audit and /metrics."""
    sandbox.provider.configure(access_token_ttl=3, rotate_refresh_tokens=True)
    c = Cluster(tmp_path, sandbox.url, extra_env={
        **FAST, "CREDBROKER_HTTP_CONNECT_TIMEOUT": "0.5", "CREDBROKER_HTTP_READ_TIMEOUT": "3",
        "CREDBROKER_PROVIDER_MAX_ATTEMPTS": "1", "CREDBROKER_PROVIDER_RETRY_SECONDS": "0",
        "CREDBROKER_LEASE_MARGIN_SECONDS": "1"})
    try:
        c.start_worker("w1", concurrency=1)
        connect(c, "fay")
        wait_expired(c, "fay")
        sandbox.provider.set_latency("token", 1500)
        before = arrivals(sandbox)
        with c.client() as client:
            t, out = in_thread(lambda: client.resolve("fay", "gh", timeout=6))
            wait_for(lambda: arrivals(sandbox) > before, 10, what="the refresh call to start")
            c.kill("w1")
            # the provider still rotates: the response goes to a dead worker
            wait_for(lambda: sandbox.provider.stats()["refresh_rotations"] == 1, 10, what="the lost rotation")
            t.join(15)
            sandbox.provider.set_latency("token", 0)
            c.start_worker("w1b", concurrency=1)
            with pytest.raises(NotConnected):
                wait_for(lambda: _resolve_until_answered(client, "fay"), 30, 0.2, what="a final answer")
        rec = row(c, "fay")
        assert rec is not None and rec.status is CredentialStatus.NEEDS_RECONNECT and rec.failure == "rotation_lost"
        stats = sandbox.provider.stats()
        assert stats["refresh_presented_twice"] == 1 and stats["presented_twice_by_user"] == {"fay": 1}
        metrics = {k.decode(): v.decode() for k, v in c.redis.hgetall(CLUSTER_HASH).items()}
        assert metrics.get('credbroker_rotation_lost_total{server="gh"}') == "1", metrics
        wait_for(lambda: "rotation_lost" in _audit_reasons(c), 10, what="the rotation_lost audit event")
    finally:
        c.stop()


def _resolve_until_answered(client: Any, user: str) -> bool:
    try:
        client.resolve(user, "gh", timeout=5)
    except NotConnected:
        raise
    except BrokerError:
        return False  # the dead flight's lease has not expired yet
    return True


def _audit_reasons(c: Cluster) -> set[str]:
    from sqlalchemy import select

    from broker.db import audit_events

    store = store_of(c)
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(select(audit_events.c.reason)).all()
        reasons = {r.reason for r in rows}
    finally:
        store.engine.dispose()
    for _, fields in c.redis.xrange(AUDIT_STREAM):  # not yet moved to SQL (no beat here)
        reasons.add(json.loads(fields[b"e"]).get("reason") or "")
    return reasons


def test_a_refresh_with_no_answer_is_not_sent_again_blindly(tmp_path: Path, sandbox: Any) -> None:
    """The provider answers after the read timeout: the flight does not retry the
    refresh token (it may be spent); the next flight presents it once, knowing the
    outcome is unknown, and reports rotation_lost when it was."""
    sandbox.provider.configure(access_token_ttl=3, rotate_refresh_tokens=True)
    c = Cluster(tmp_path, sandbox.url, extra_env={
        **FAST, "CREDBROKER_HTTP_CONNECT_TIMEOUT": "0.5", "CREDBROKER_HTTP_READ_TIMEOUT": "1",
        "CREDBROKER_PROVIDER_MAX_ATTEMPTS": "3", "CREDBROKER_PROVIDER_RETRY_SECONDS": "3"})
    try:
        c.start_worker("w1", concurrency=1)
        connect(c, "gus")
        wait_expired(c, "gus")
        sandbox.provider.set_latency("token", 2500)
        with c.client() as client:
            with pytest.raises(BrokerError) as first:
                client.resolve("gus", "gh", timeout=10)
            assert first.value.code == "upstream_error"
            wait_for(lambda: sandbox.provider.stats()["refresh_rotations"] == 1, 10, what="the unanswered rotation")
            assert sandbox.provider.stats()["refresh_presentations"] == 1  # not retried
            sandbox.provider.set_latency("token", 0)
            with pytest.raises(NotConnected):
                client.resolve("gus", "gh", timeout=10)
        rec = row(c, "gus")
        assert rec is not None and rec.status is CredentialStatus.NEEDS_RECONNECT and rec.failure == "rotation_lost"
        assert sandbox.provider.stats()["presented_twice_by_user"] == {"gus": 1}
    finally:
        c.stop()
