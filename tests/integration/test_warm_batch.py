"""Batch warms (``broker.warm_batch``) on a real cluster: worker processes,
Redis, the sandbox provider over HTTP.

A batch mints each exchange user once (one provider call, one
``connection.connected`` event) and re-caches fresh credentials with no call;
a resolve and a batch pair join each other's flight either way round; a
connect-mode server skips users never connected and renews a due credential
through the ordinary flight; the server's concurrency limit holds inside a
batch; a provider failure ends the batch FAILURE with its counts and fails a
joined resolve promptly; ``credbroker warm --batch`` adds up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from broker.errors import BrokerError
from broker.events import CONNECTED, EventLog
from broker.resolver import Resolved
from broker.servers import servers_from_settings
from tests.cluster import Cluster, wait_for
from tests.integration.test_cluster import connect, provider_tokens, sign_in, store_of
from tests.integration.test_warm import _seed_users, grants
from tests.secrets import assert_no_leak, find_leaks, register
from workers.celery.app import TASK_WARM_BATCH
from workers.common.constants import cache_key, flight_key
from workers.common.flight import new_task_id
from workers.common.metrics import METRICS
from workers.common.outcomes import flight_result

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def key_of(cluster: Cluster, server: str) -> str:
    return servers_from_settings(cluster.settings)[server].key


def send_batch(client: Any, server: str, users: list[str]) -> str:
    """Queue one ``broker.warm_batch`` task, as ``credbroker warm`` does."""
    task_id = new_task_id()
    client.celery.send_task(TASK_WARM_BATCH, args=[server, users], task_id=task_id)
    return task_id


def batch_meta(client: Any, task_id: str, timeout: float = 20) -> dict[str, Any]:
    meta = client.waiter.wait(task_id, time.monotonic() + timeout, lambda: True)
    assert meta is not None, f"warm batch {task_id} gave no result in {timeout}s"
    return meta


def warm_batch(client: Any, server: str, users: list[str], timeout: float = 20) -> dict[str, Any]:
    """A batch's counts; it must end SUCCESS."""
    meta = batch_meta(client, send_batch(client, server, users), timeout)
    assert meta["status"] == "SUCCESS", meta
    return meta["result"]


def connected_events(cluster: Cluster, server: str) -> dict[str, int]:
    """connection.connected events per user for one server."""
    store = store_of(cluster)
    try:
        key = key_of(cluster, server)
        out: dict[str, int] = {}
        for e in EventLog(store.engine).after(0, 100_000):
            if e.type == CONNECTED and e.server == key:
                out[e.user_id] = out.get(e.user_id, 0) + 1
        return out
    finally:
        store.engine.dispose()


def seed(cluster: Cluster, sandbox: Any, users: list[str]) -> None:
    store = store_of(cluster)
    try:
        _seed_users(store, sandbox, users)
    finally:
        store.engine.dispose()


def fast_resolves() -> float:
    return METRICS.value("credbroker_resolves_total", outcome="ok", path="fast")


def joins() -> float:
    return METRICS.value("credbroker_flight_joins_total")


def calls(sandbox: Any) -> int:
    return int(sandbox.provider.stats()["arrivals"].get("token", 0))


@pytest.fixture
def started(cluster: Cluster) -> Cluster:
    cluster.start_worker(concurrency=2)
    return cluster


def test_first_mints_in_one_batch_then_cached(started: Cluster, sandbox: Any) -> None:
    cluster = started
    users = [f"bw-{i:02d}" for i in range(40)]
    seed(cluster, sandbox, users)
    with cluster.client() as client:
        result = warm_batch(client, "tx", users)
        assert result["users"] == 40 and result["minted"] == 40
        assert result["skipped"] == {} and result["failed"] == {} and result.get("joined", 0) == 0
        per_user = sandbox.provider.stats()["by_user"]
        assert {u: per_user.get(u) for u in users} == {u: {"token_exchange": 1} for u in users}
        assert connected_events(cluster, "tx") == dict.fromkeys(users, 1)
        key = key_of(cluster, "tx")
        assert all(cluster.redis.exists(cache_key(u, key)) for u in users)
        assert not cluster.redis.keys(b"credbroker:flight:*")  # every pair's claim released

        before = fast_resolves()
        for user in users:
            resolved = client.resolve(user, "tx", timeout=10)
            assert resolved.obtained_via == "token_exchange"
            register(resolved.value.reveal()[7:])
        assert fast_resolves() - before == 40
        assert calls(sandbox) == 40

        # The same batch again: every credential fresh, re-cached, nobody asked.
        for user in users[:5]:
            cluster.redis.delete(cache_key(user, key))
        again = warm_batch(client, "tx", users)
        assert again["cached"] == 40 and again.get("minted", 0) == 0 and again["failed"] == {}
        assert calls(sandbox) == 40
        assert all(cluster.redis.exists(cache_key(u, key)) for u in users)
        assert connected_events(cluster, "tx") == dict.fromkeys(users, 1)
    assert_no_leak(cluster.all_logs(), "worker logs")


def test_resolve_and_batch_join_each_other(started: Cluster, sandbox: Any) -> None:
    cluster = started
    first = [f"jr-{i}" for i in range(5)]
    second = [f"jb-{i}" for i in range(5)]
    seed(cluster, sandbox, first + second)
    sandbox.provider.set_latency("token", 1000)
    key = key_of(cluster, "tx")
    with cluster.client() as client:
        # A resolve in flight first: the batch leaves its pair to it.
        got: dict[str, Resolved] = {}
        t = threading.Thread(target=lambda: got.update(r=client.resolve(first[0], "tx", timeout=15)))
        t.start()
        wait_for(lambda: calls(sandbox) >= 1, 10, what="the resolve's provider call to start")
        result = warm_batch(client, "tx", first)
        t.join(15)
        assert result["joined"] == 1 and result["minted"] == 4
        assert got["r"].obtained_via == "token_exchange"
        assert all(grants(sandbox, u) == {"token_exchange": 1} for u in first)

        # A batch in flight first: a resolve of one of its users joins that pair.
        task_id = send_batch(client, "tx", second)
        wait_for(lambda: calls(sandbox) >= 10, 10, what="the batch's provider calls to start")
        assert b"/" in cluster.redis.get(flight_key(second[0], key))  # the batch's pair holds the claim
        before = joins()
        resolved = client.resolve(second[0], "tx", timeout=15)
        assert joins() - before == 1
        assert resolved.obtained_via == "token_exchange"
        register(resolved.value.reveal()[7:])
        meta = batch_meta(client, task_id)
        assert meta["status"] == "SUCCESS" and meta["result"]["minted"] == 5
        assert meta["result"].get("joined", 0) == 0
        assert all(grants(sandbox, u) == {"token_exchange": 1} for u in second)
        # The joiner got the batch's credential: the next resolve is a cache hit with the same value.
        before = fast_resolves()
        assert client.resolve(second[0], "tx", timeout=5).value == resolved.value
        assert fast_resolves() - before == 1
    assert calls(sandbox) == 10


def test_connect_server_skips_and_renews_through_the_flight(started: Cluster, sandbox: Any) -> None:
    cluster = started
    connect(cluster, "fresh")
    # A lifetime no longer than the refresh margin: due the moment it is stored.
    sandbox.provider.configure(access_token_ttl=60)
    connect(cluster, "due")
    sandbox.provider.configure(access_token_ttl=3600)
    assert grants(sandbox, "due") == {"authorization_code": 1}
    with cluster.client() as client:
        result = warm_batch(client, "gh", ["fresh", "due", "never-1", "never-2"])
        assert result["skipped"] == {"never_connected": 2}
        assert result["renewed"] == 1 and result["cached"] == 1 and result["failed"] == {}
        assert result.get("minted", 0) == 0
        assert grants(sandbox, "due") == {"authorization_code": 1, "refresh_token": 1}
        assert grants(sandbox, "fresh") == {"authorization_code": 1}
        before = fast_resolves()
        for user in ("fresh", "due"):
            assert client.resolve(user, "gh", timeout=10).obtained_via == "connect_flow"
        assert fast_resolves() - before == 2
        assert grants(sandbox, "due") == {"authorization_code": 1, "refresh_token": 1}
        assert not cluster.redis.keys(b"credbroker:flight:*")
    provider_tokens(sandbox)
    assert_no_leak(cluster.all_logs(), "worker logs")


def test_batch_keeps_the_server_concurrency_limit(tmp_path: Path, sandbox: Any) -> None:
    cluster = Cluster(tmp_path, sandbox.url, extra_env={"CREDBROKER_SERVER_MAX_CONCURRENCY": "3"})
    try:
        cluster.start_worker(concurrency=2)
        users = [f"cc-{i:02d}" for i in range(20)]
        seed(cluster, sandbox, users)
        sandbox.provider.set_latency("token", 300)
        with cluster.client() as client:
            started = time.monotonic()
            result = warm_batch(client, "tx", users)
            elapsed = time.monotonic() - started
        assert result["minted"] == 20 and result["failed"] == {}
        stats = sandbox.provider.stats()
        assert stats["arrivals"]["token"] == 20
        # Three at once, never more: seven waves of 300 ms.
        assert stats["max_in_flight"]["token"] == 3
        assert elapsed >= 7 * 0.3
    finally:
        cluster.stop()


def test_provider_failure_fails_the_batch_and_its_joiner(started: Cluster, sandbox: Any) -> None:
    cluster = started
    users = [f"pf-{i}" for i in range(5)]
    seed(cluster, sandbox, users)
    key = key_of(cluster, "tx")
    sandbox.provider.set_latency("token", 1000)
    sandbox.provider.set_fault("token", "invalid_grant")
    with cluster.client() as client:
        task_id = send_batch(client, "tx", users)
        wait_for(lambda: cluster.redis.exists(flight_key(users[0], key)), 10, what="the batch to claim its pairs")
        before = joins()
        started_at = time.monotonic()
        with pytest.raises(BrokerError) as info:
            client.resolve(users[0], "tx", timeout=15)
        assert time.monotonic() - started_at < 8  # two 1 s calls, not the 15 s deadline
        assert joins() - before == 1
        assert info.value.to_dict().get("oauth_error") == "invalid_grant"
        meta = batch_meta(client, task_id)
    assert meta["status"] == "FAILURE"
    assert meta["result"]["exc_type"] == "FlightFailed"
    text = meta["result"]["exc_message"][0]
    assert text == "5 of 5 warms failed: invalid_grant x5"
    assert find_leaks(json.dumps(meta)) == []
    counts = flight_result(meta)
    assert counts is not None
    assert counts["failed"] == {"invalid_grant": 5} and counts["users"] == 5
    assert counts.get("minted", 0) == 0 and counts.get("joined", 0) == 0
    assert all(grants(sandbox, u) == {} for u in users)  # refused: no grant counted
    # A warm's failure does not answer a caller (``ClientCore.read_flight``):
    # the joined resolve flew once itself and raised its own flight's error.
    assert calls(sandbox) == 6
    assert not cluster.redis.keys(b"credbroker:flight:*")
    assert_no_leak(cluster.all_logs(), "worker logs")


def test_cli_bulk_warm_in_batches(started: Cluster, sandbox: Any) -> None:
    cluster = started
    users = [f"cli-{i:02d}" for i in range(30)]
    seed(cluster, sandbox, users)
    connect(cluster, "gh-only")  # known to the store, but no subject token: skipped for tx
    with cluster.client() as client:
        for user in users[:6]:  # already warm: cached, no provider call
            register(client.resolve(user, "tx", timeout=10).value.reveal()[7:])
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDBROKER_")}
    env.update(cluster.env)
    out = subprocess.run([sys.executable, "-m", "workers.cli.main", "warm", "--all-users", "--server", "tx",
                          "--batch", "8", "--json"], env=env, cwd=ROOT, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    summary = json.loads(out.stdout)
    assert summary["users"] == 31
    assert summary["flights"] + summary["joined"] + sum(summary["skipped"].values()) == 31
    assert summary["flights"] == 30 and summary["joined"] == 0
    assert summary["skipped"] == {"subject_token_missing": 1} and summary["failed"] == {}
    per_user = sandbox.provider.stats()["by_user"]
    assert all(per_user[u] == {"token_exchange": 1} for u in users)
    assert connected_events(cluster, "tx") == dict.fromkeys(users, 1)
    assert_no_leak(out.stdout.decode() + out.stderr.decode(), "warm output")
