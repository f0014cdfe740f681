"""Connection lifecycle events on a real cluster: two workers and a beat,
callers hammering the same connection, each state change announced once and
in order; expiry announced by the workers' housekeeping; the events API."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from broker.db import make_engine
from broker.errors import BrokerError
from broker.events import EventLog
from tests.cluster import Cluster, wait_for
from tests.integration.test_cluster import connect
from workers.credentials import remove_credential
from workers.runtime import build_runtime

pytestmark = pytest.mark.integration

ENV = {
    # A 30 s credential is due 3 s after issue (27 s before expiry) and served
    # from the cache only until then, so renewals happen within seconds.
    "CREDBROKER_NEAR_EXPIRY_SECONDS": "27",
    "CREDBROKER_REFRESH_FRACTION": "1.0",
    "CREDBROKER_REFRESH_SCAN_SECONDS": "0.5",
    "CREDBROKER_REFRESH_JITTER_SECONDS": "0.1",
    "CREDBROKER_PROVIDER_RETRY_SECONDS": "0.5",
}


def events_of(cluster: Cluster, user: str) -> list[dict[str, Any]]:
    engine = make_engine(cluster.settings.database_url)
    try:
        names = {"gh": "gh"}
        from broker.servers import servers_from_settings

        reg = servers_from_settings(cluster.settings)
        names = {reg[n].key: n for n in reg}
        return [e.to_dict() for e in EventLog(engine, names.get).after(0, 1000) if e.user_id == user]
    finally:
        engine.dispose()


def kinds(cluster: Cluster, user: str) -> list[str]:
    return [e["type"].split(".", 1)[1] for e in events_of(cluster, user)]


class Hammer:
    """Threads resolving one (user, server) in a loop, errors included."""

    def __init__(self, cluster: Cluster, user: str, server: str, threads: int = 6) -> None:
        self.client = cluster.client()
        self.stop_flag = threading.Event()
        self.calls = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(user, server), daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, user: str, server: str) -> None:
        while not self.stop_flag.is_set():
            try:
                self.client.resolve(user, server, timeout=10)
            except BrokerError:
                pass
            with self.lock:
                self.calls += 1
            self.stop_flag.wait(0.02)  # pacing only; nothing waits on it

    def stop(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(15)
        self.client.close()


def test_each_change_announced_once_across_two_workers_and_a_beat(tmp_path, sandbox) -> None:  # type: ignore[no-untyped-def]
    cluster = Cluster(tmp_path, sandbox.url, extra_env=ENV)
    provider = sandbox.provider
    try:
        cluster.start_worker("w1", concurrency=2)
        cluster.start_worker("w2", concurrency=2)
        cluster.start_beat()

        # An idle connection expires: the housekeeping scan says so once; a use renews it.
        provider.configure(access_token_ttl=2)
        connect(cluster, "ivy")
        wait_for(lambda: kinds(cluster, "ivy") == ["connected", "expired"], 15, what="ivy's expiry event")
        provider.configure(access_token_ttl=30)
        with cluster.client() as client:
            client.resolve("ivy", "gh", timeout=20)
        wait_for(lambda: kinds(cluster, "ivy") == ["connected", "expired", "recovered"], 10, what="ivy recovered")

        connect(cluster, "eve")
        hammer = Hammer(cluster, "eve", "gh")
        try:
            provider.set_fault("token", "5xx")
            wait_for(lambda: "degraded" in kinds(cluster, "eve"), 20, what="degraded")
            calls = hammer.calls  # resolves keep coming while degraded (served stale, renewals backed off)
            wait_for(lambda: hammer.calls >= calls + 30, 20, what="more resolves while degraded")
            provider.set_fault("token", None)
            wait_for(lambda: "recovered" in kinds(cluster, "eve"), 40, what="recovered (after the backoff)")
            refreshes = provider.stats()["grants"]["refresh_token"]
            wait_for(lambda: provider.stats()["grants"]["refresh_token"] >= refreshes + 2, 20,
                     what="two more good renewals")
            provider.reset()  # the provider forgets every grant: the next renewal gets invalid_grant
            wait_for(lambda: "needs_reconnect" in kinds(cluster, "eve"), 20, what="needs_reconnect")
            calls = hammer.calls
            wait_for(lambda: hammer.calls >= calls + 30, 20, what="more resolves after the change")
        finally:
            hammer.stop()
        rt = build_runtime(cluster.settings)
        try:
            assert remove_credential(rt, "eve", "gh")
        finally:
            rt.close()
        wait_for(lambda: "disconnected" in kinds(cluster, "eve"), 5, what="disconnected")
        assert hammer.calls > 100
        got = events_of(cluster, "eve")
        assert [e["type"] for e in got] == ["connection.connected", "connection.degraded", "connection.recovered",
                                            "connection.needs_reconnect", "connection.disconnected"], got
        assert [e["status"] for e in got] == ["connected", "degraded", "connected", "needs_reconnect",
                                              "not_connected"]
        assert got[1]["reason"] and got[3]["reason"] == "invalid_grant"
        assert all(e["server"] == "gh" for e in got)
        ids = [e["id"] for e in got]
        assert ids == sorted(ids)
        # ivy was in use too (beat renewals), so the fault and the reset reached her
        # as well: whatever she went through, each change once, never a repeat.
        ivy = kinds(cluster, "ivy")
        assert ivy[:3] == ["connected", "expired", "recovered"]
        assert all(a != b for a, b in zip(ivy, ivy[1:])), ivy
    finally:
        cluster.stop()
